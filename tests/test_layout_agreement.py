"""The final evaluation's per-example verdicts (utils.RobustEval.robust) and bench.py's layout_agreement
part, which compares them between the memory layouts."""
from __future__ import annotations

import json

import torch

import bench
import models
import utils


def test_verdicts_follow_the_input_order_and_add_up_to_the_robust_accuracy():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 8).eval()
    x = torch.rand(120, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    wrong = torch.arange(120) % 3 == 0  # every third label is not the prediction: never robust
    y = torch.where(wrong, (y + 1) % 10, y)
    result = utils.seeded_robust_accuracy(model, list(zip(x.split(50), y.split(50))), 16 / 255, 10, 2, seed=0)
    assert result.robust.dtype == torch.bool and result.robust.shape == (120,)
    assert int(result.robust.sum()) == round(result.pgd_acc * 120)
    assert not result.robust[wrong].any()
    assert 0 < int(result.robust.sum()) < int((~wrong).sum())  # some robust, some broken by the attack


def test_default_parts_leave_out_the_layout_agreement():
    s = bench.parse_settings(["--device", "cpu"])
    assert "layout_agreement" not in s.parts and s.parts == bench.DEFAULT_PARTS
    assert s.agreement["resnet18"] == bench.EvalSize(1000, 256, 50, 10)


def test_quick_layout_agreement_counts_differing_verdicts(tmp_path):
    out = tmp_path / "b.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--parts", "layout_agreement", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["layout_agreement"]) == {"cnn", "resnet18"}
    for r in report["layout_agreement"].values():
        assert 0 <= r["verdicts_differ"] <= r["n_eval"]
        assert r["within_rounding"] == (r["verdicts_differ"] <= r["allowed"])
        for layout in ("contiguous", "channels_last"):
            assert 0 <= r[f"robust_acc_{layout}"] <= r[f"clean_acc_{layout}"] <= 1
            assert r[f"seconds_{layout}"] > 0
        # a verdict that differs moves the robust accuracy by at most one example each
        gap = abs(r["robust_acc_contiguous"] - r["robust_acc_channels_last"]) * r["n_eval"]
        assert gap <= r["verdicts_differ"] + 1e-6
    assert report["layout_agreement"]["resnet18"]["clean_acc_contiguous"] == 1.0  # every example attacked
