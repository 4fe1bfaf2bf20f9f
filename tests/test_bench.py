"""bench.py end to end at --quick sizes: every method timed for both models, the evaluation's cost
and accuracies in range, bench.json written (CPU; a CUDA variant where a GPU is present); its flags
checked before any timing. The GPU check is gpu_check.py (tests/test_gpu_check.py), the comparison
with the authors' code authors_compare.py (tests/test_authors_compare.py)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import autoattack_eval
import bench
import timing


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
        assert set(lay["chosen"]) == {"train", "eval"}
        assert set(lay["chosen"].values()) <= {"contiguous", "channels_last"}
        assert lay["chosen_eval_batch_size"] in report["settings"]["eval_batch_candidates"][model_name]
    assert "versus_reference" not in report  # authors_compare.py's


@pytest.mark.slow
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


def test_bad_flags_exit_with_usage_error_in_one_line(capsys):
    for argv in (["--models", "vgg"], ["--acceptance"]):  # the GPU check is gpu_check.py
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.cuda
def test_quick_bench_on_cuda_reports_peak_memory(tmp_path):
    report = run_quick(tmp_path, "cuda")
    check_report(report, "cuda")
    for steps in report["steps"].values():
        assert steps["unit_peak_mib"] > 0
        assert all(m["peak_mib"] > 0 for m in steps["methods"].values())
        assert steps["settings"]["cudnn_benchmark"] in (True, False)
    assert all(e["peak_mib"] > 0 for e in report["eval"].values())


def test_wrn28_10_has_sizes_and_a_cifar_config_for_every_method():
    # (timing it is too slow for the suite on a CPU: one forward+backward of 2 images takes seconds)
    s = bench.parse_settings(["--quick", "--models", "wrn28_10", "--device", "cpu"])
    assert s.models == ("wrn28_10",) and s.batch_sizes["wrn28_10"] == 2 and s.evals["wrn28_10"].n_eval == 2
    for method in bench.METHODS:
        cfg = timing.method_config("wrn28_10", method, 2, s.device)
        assert (cfg.model, cfg.dataset) == ("wrn28_10", "cifar10")


def test_every_model_has_sizes_and_the_authors_networks_take_their_family_s():
    import models
    assert set(timing.INPUT_SHAPES) == set(models.MODELS)
    for device_args in (["--quick"], []):
        s = bench.parse_settings([*device_args, "--models", *models.MODELS, "--device", "cpu"])
        for name, like in timing.SIZED_AS.items():
            assert (s.batch_sizes[name], s.evals[name], s.eval_batch_candidates[name]) == (
                s.batch_sizes[like], s.evals[like], s.eval_batch_candidates[like])
        for name in models.MODELS:
            cfg = timing.method_config(name, next(iter(bench.METHODS)), s.batch_sizes[name], s.device)
            assert cfg.model == name and cfg.dataset == ("digits" if name.startswith("cnn") else "cifar10")


@pytest.mark.parametrize("argv, message", [
    (["--budget_s", "-5"], "--budget_s must be a finite number of seconds >= 0 (got -5; 0: no limit)"),
    (["--budget_s", "nan"], "--budget_s must be a finite number of seconds >= 0"),
    (["--threads", "-1"], "--threads must be in [0, "),
    (["--threads", "100000"], "--threads must be in [0, "),
    (["--repeats", "0"], "--batch_size and --repeats must be >= 1"),
    (["--repeats", "1000000"], f"--repeats must be at most {timing.MAX_REPEATS}"),
    (["--out", "nodir/x/b.json"], "the folder "),
    (["--parts", "reference"], "its own tool now: python authors_compare.py"),
    (["--run", "runs/x"], "its own tool now: python authors_compare.py"),
])
def test_unbounded_values_and_an_unwritable_out_are_refused_before_any_timing(tmp_path, monkeypatch, cli, argv,
                                                                               message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(timing, "time_interleaved", lambda *a, **k: pytest.fail("timed before the check"))
    r = cli("bench.py", "--quick", "--device", "cpu", *argv)
    assert r.code == 2 and len(r.err_lines) == 1 and message in r.err, r.err
    assert "Traceback" not in r.err and os.listdir(tmp_path) == []  # nothing written


def test_out_problem_names_each_unwritable_place(tmp_path):
    missing = tmp_path / "nodir" / "x" / "b.json"
    assert timing.out_problem(str(missing)) == (
        f"--out {missing}: the folder {missing.parent} does not exist; create it (mkdir -p {missing.parent}) or "
        "pick another --out")
    assert "is a folder" in timing.out_problem(str(tmp_path))
    assert timing.out_problem(str(tmp_path / "b.json")) is None
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere
        pytest.skip("this user can write a read-only folder")
    assert "permission denied" in timing.out_problem(str(locked / "b.json"))
