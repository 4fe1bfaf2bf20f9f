"""bench.py end to end at --quick sizes: every method timed for both models, the evaluation's cost
and accuracies in range, bench.json written (CPU; a CUDA variant where a GPU is present)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import autoattack_eval
import bench


def run_quick(tmp_path, device: str, *extra: str) -> dict:
    out = tmp_path / "b.json"
    # One thread: the test stays fast when other processes share the cores.
    assert bench.main(["--quick", "--device", device, "--threads", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def check_report(report: dict, device: str) -> None:
    assert report["device"].startswith(device)
    assert report["torch"] == torch.__version__
    assert set(report["steps"]) == {"cnn", "resnet18"} == set(report["eval"])
    for model_name, steps in report["steps"].items():
        assert steps["batch_size"] == report["settings"]["batch_sizes"][model_name]
        assert steps["unit_ms"] > 0 and math.isfinite(steps["unit_ms"])
        assert set(steps["methods"]) == set(bench.METHODS)
        for method in steps["methods"].values():
            assert method["units"] > 0 and math.isfinite(method["units"]), method
            assert method["ms"] > 0 and math.isfinite(method["ms"]), method
    for e in report["eval"].values():
        full = e["n_iters"] * e["n_restarts"]
        assert e["reference_passes_per_example"] == full <= 500
        assert 0 <= e["passes_per_example"] <= full
        assert 0 <= e["robust_acc"] <= e["clean_acc"] <= 1
        assert e["passes_per_example"] >= e["floor_passes_per_example"] - 1e-9  # robust examples cost every pass
        assert e["images_per_s"] > 0 and math.isfinite(e["images_per_s"])
    assert report["reference"]["eval_pgd_50_10"]["grad_passes_per_example"] == 500
    for model_name, lay in report["layouts"].items():  # every pass in both layouts, and a choice per pass
        assert {(r["layout"], r["pass"]) for r in lay["rows"]} == {
            (layout, p) for layout in ("contiguous", "channels_last") for p in ("eval", "train_attack", "train_step")}
        assert all(r["ms"] > 0 for r in lay["rows"])
        assert set(lay["chosen"]) == {"train", "eval"} and set(lay["chosen"].values()) <= {"contiguous", "channels_last"}
        assert lay["chosen_eval_batch_size"] in report["settings"]["eval_batch_candidates"][model_name]
    for ref in report["versus_reference"].values():  # ours beside the authors' on the same model and points
        assert ref["pgd_speedup"] > 0 and ref["gradalign_speedup"] > 0
        assert 0 <= ref["robust_acc_ours"] <= ref["robust_acc_theirs"] + 1e-9  # no-restart-fools rule: never weaker


def test_quick_bench_on_cpu_writes_every_number(tmp_path, capsys):
    with_aa = autoattack_eval.available()  # the optional extra (installed by the README's test command)
    report = run_quick(tmp_path, "cpu", *(["--autoattack"] if with_aa else []))
    check_report(report, "cpu")
    printed = capsys.readouterr().out
    if with_aa:  # AutoAttack beside PGD on the digits cnn's points, at --quick's custom budget
        cnn = report["eval"]["cnn"]
        a = cnn["autoattack"]
        assert (a["attack"], a["attack_version"], a["clean_acc"]) == ("autoattack", "custom", cnn["clean_acc"])
        assert list(a["stage_acc"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert 0 <= a["robust_acc"] <= a["clean_acc"] and a["images_per_s"] > 0
        assert a["grad_passes_per_example"] >= 6 * a["robust_acc"]  # a robust point took APGD-CE's 5 steps + 1
        assert "AutoAttack (custom, torchattacks" in printed
    for steps in report["steps"].values():
        assert all(m["peak_mib"] is None for m in steps["methods"].values())
    assert "FGSM + GradAlign" in printed and "images/s" in printed and "floor" in printed


def test_bad_flags_exit_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "vgg"])
    assert exc.value.code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_bench_on_cuda_reports_peak_memory(tmp_path):
    report = run_quick(tmp_path, "cuda")
    check_report(report, "cuda")
    for steps in report["steps"].values():
        assert steps["unit_peak_mib"] > 0
        assert all(m["peak_mib"] > 0 for m in steps["methods"].values())
        assert steps["settings"]["cudnn_benchmark"] in (True, False)
    assert all(e["peak_mib"] > 0 for e in report["eval"].values())


ABSENT = ("cuda_tests", "epochs", "peak_mib", "evaluation", "projection")


def test_acceptance_without_cuda_runs_the_cpu_parts_and_marks_cuda_absent(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    out = tmp_path / "acceptance.json"
    assert bench.main(["--acceptance", "--device", "cuda", "--threads", "1", "--out", str(out)]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["cuda_available"] is False
    assert all(report[key] == "absent: no CUDA" for key in ABSENT)
    agreement = report["agreement"]
    assert 0.9 < agreement["cos_update_fp16_fp32"] <= 1 + 1e-9 and agreement["reg_fp32"] > 0
    rows = report["zero_input_grads"]
    assert [round(r["median_margin_nats"]) for r in rows] == [10, 15, 20, 25]
    assert all(r["fp16_scaled"] <= r["fp16_unscaled"] for r in rows)
    assert any(r["fp16_scaled"] < r["fp16_unscaled"] for r in rows)


def test_acceptance_epoch_timing_and_projection_at_tiny_size_on_cpu(one_thread):
    cpu = torch.device("cpu")
    epoch = bench.epoch_seconds("cnn", "gradalign", 64, 32, cpu, warmup_steps=1)
    assert epoch["steps"] == 2 and epoch["seconds_per_epoch"] > 0 and epoch["peak_mib"] is None
    assert math.isfinite(epoch["train_loss"])
    evaluation = bench.evaluation_seconds("cnn", cpu, n=32)
    p = bench.projection({"gradalign": epoch}, evaluation)
    assert p["periodic_evaluations"] == 59  # 11700 steps, evaluated at 0, 200, ..., 11600
    assert math.isclose(p["train_s"], 30 * 390 * epoch["seconds_per_epoch"] / 2)
    assert math.isclose(p["total_minutes"] * 60,
                        p["train_s"] + 59 * evaluation["periodic_evaluation_s"] + 1000 * 500
                        * evaluation["fp32_pass_s_per_example"])
