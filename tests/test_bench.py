"""bench.py end to end at --quick sizes: every method timed for both models, the evaluation's cost
and accuracies in range, bench.json written (CPU; a CUDA variant where a GPU is present)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import bench


def run_quick(tmp_path, device: str) -> dict:
    out = tmp_path / "b.json"
    # One thread: the test stays fast when other processes share the cores.
    assert bench.main(["--quick", "--device", device, "--threads", "1", "--out", str(out)]) == 0
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


def test_quick_bench_on_cpu_writes_every_number(tmp_path, capsys):
    report = run_quick(tmp_path, "cpu")
    check_report(report, "cpu")
    for steps in report["steps"].values():
        assert all(m["peak_mib"] is None for m in steps["methods"].values())
    printed = capsys.readouterr().out
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
