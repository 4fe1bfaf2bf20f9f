"""bench.py end to end at --quick sizes: every method timed for both models, the evaluation's cost
and accuracies in range, bench.json written (CPU; a CUDA variant where a GPU is present). The GPU
check is gpu_check.py (tests/test_gpu_check.py)."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

import autoattack_eval
import bench
import models
import utils


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
    for ref in report["versus_reference"].values():  # ours beside the authors' on the same model and points
        assert ref["pgd_speedup"] > 0 and ref["gradalign_speedup"] > 0
        assert 0 <= ref["robust_acc_ours"] <= ref["robust_acc_theirs"] + 1e-9  # no-restart-fools rule: never weaker


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
        cfg = bench.method_config("wrn28_10", method, 2, s.device)
        assert (cfg.model, cfg.dataset) == ("wrn28_10", "cifar10")


AUTHORS_UTILS = '''import apex.amp as amp  # the authors' file imports apex at the top, as this stand-in does

import bench


def rob_acc(batches, model, eps, pgd_alpha, opt, half_prec, attack_iters, n_restarts, rs=True, linf_proj=True,
            l2_grad_update=False, corner=False, print_fosc=False, verbose=False, cuda=True):
    assert opt is None and not half_prec and not cuda and abs(pgd_alpha - eps / 4) < 1e-12
    acc = bench.reference_pgd_accuracy(model, batches, eps, attack_iters, n_restarts)
    return {wrong}, 0.0, None
'''


@pytest.mark.parametrize("wrong", [False, True])
def test_reference_part_on_a_finished_run_beside_the_authors_code(tmp_path, tiny_run, capsys, wrong):
    """--run attacks a finished run's weights on the points of its final evaluation (ours repeats final.json's
    robust accuracy); --authors_code imports a checkout's utils.py (apex not installed) and times its rob_acc
    beside the restatement, saying whether the two robust accuracies agree. Here the checkout is a stand-in
    with the authors' signature that runs the restatement (or returns a wrong accuracy)."""
    run = tiny_run("--attack", "fgsm")
    authors = tmp_path / "authors"
    authors.mkdir()
    (authors / "utils.py").write_text(AUTHORS_UTILS.format(wrong="1.5" if wrong else "acc"))
    report = run_quick(tmp_path, "cpu", "--parts", "reference", "--run", run.run_dir, "--authors_code", str(authors))
    assert list(report["versus_reference"]) == ["cnn"]
    r = report["versus_reference"]["cnn"]
    final = run.final
    assert (r["n_eval"], r["n_iters"], r["n_restarts"]) == (final["n_eval"], final["attack_iters"], final["n_restarts"])
    assert r["seed"] == run.config["seed"] and r["eps"] == pytest.approx(run.config["eps"] / 255)
    assert r["robust_acc_ours"] == r["robust_acc_final_json"] == final["last"]["pgd_acc"]
    assert r["robust_acc_ours"] <= r["robust_acc_theirs"]
    assert r["restatement_agrees"] is (not wrong)
    assert r["pgd_s_authors_code"] > 0 and r["pgd_speedup_authors_code"] > 0
    assert "apex" not in sys.modules  # the stand-in is gone once the file is imported
    assert ("DISAGREES" in capsys.readouterr().out) is wrong


def test_run_and_authors_code_are_checked_before_any_timing(tmp_path, finished, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rob_acc = tmp_path / "other"
    no_rob_acc.mkdir()
    (no_rob_acc / "utils.py").write_text("x = 1\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "utils.py").write_text("import module_that_is_not_there\n")
    damaged = tmp_path / "damaged"
    shutil.copytree(finished, damaged)
    (damaged / "final.json").write_text('{"last": {}}')
    out = tmp_path / "b.json"
    common = ["--quick", "--device", "cpu", "--out", out]
    cases = {("--parts", "steps", "--run", finished): "add reference to --parts",
             ("--parts", "reference", "--run", empty): "not a finished train.py run",
             ("--parts", "reference", "--authors_code", empty): "no utils.py there",
             ("--parts", "reference", "--authors_code", no_rob_acc): "has no rob_acc",
             ("--parts", "reference", "--authors_code", broken): "importing its utils.py failed: ModuleNotFoundError",
             ("--parts", "reference", "--run", damaged): "final.json is damaged"}
    for argv, message in cases.items():
        r = cli("bench.py", *common, *argv)
        assert r.code == 2 and len(r.err_lines) == 1 and message in r.err, (argv, r.err)
        assert not out.exists()


def test_the_restated_authors_evaluation_does_their_work():
    """reference_pgd_accuracy costs what the authors' rob_acc costs: its backward also fills every weight's
    gradient (their loss.backward()), and it attacks every example in every restart from the seeded draws that
    ours takes, so that with the same seed it is never stronger than ours."""
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 8).eval()
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    calls = []
    model.register_forward_pre_hook(lambda _m, inputs: calls.append(len(inputs[0])))
    torch.manual_seed(0)
    theirs = bench.reference_pgd_accuracy(model, [(x, y)], 16 / 255, 5, 3)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert calls == [40] * (3 * (5 + 1) + 1)  # 5 steps and a loss per restart, the final forward: full batches
    ours = utils.seeded_robust_accuracy(model.requires_grad_(False), [(x, y)], 16 / 255, 5, 3, seed=0)
    assert ours.pgd_acc <= theirs
