"""authors_compare.py: our PGD-50-10 and GradAlign step beside the authors' restated versions (and their
own rob_acc from a checkout, here a stand-in) at --quick sizes, on the bench models or a finished run;
its flags checked before any timing (CPU)."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import authors_compare
import bench
import models
import utils


def run_quick(tmp_path, *extra: str) -> dict:
    out = tmp_path / "c.json"
    assert authors_compare.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_comparison_on_the_bench_models(tmp_path, capsys):
    report = run_quick(tmp_path)
    assert set(report["versus_reference"]) == {"cnn", "resnet18"} and report["run"] is None
    for ref in report["versus_reference"].values():  # ours beside the authors' on the same model and points
        assert ref["pgd_speedup"] > 0 and ref["gradalign_speedup"] > 0
        assert 0 <= ref["robust_acc_ours"] <= ref["robust_acc_theirs"] + 1e-9  # no-restart-fools rule: never weaker
    assert "faster at robust acc" in capsys.readouterr().out


def test_bench_names_the_new_home_of_the_comparison_for_one_release():
    for old, new in bench.AUTHORS_COMPARE_NAMES.items():
        assert hasattr(authors_compare, new)
        with pytest.raises(AttributeError, match=f"bench.{old} is authors_compare.{new} now"):
            getattr(bench, old)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        _ = bench.no_such_name


AUTHORS_UTILS = '''import apex.amp as amp  # the authors' file imports apex at the top, as this stand-in does

import authors_compare


def rob_acc(batches, model, eps, pgd_alpha, opt, half_prec, attack_iters, n_restarts, rs=True, linf_proj=True,
            l2_grad_update=False, corner=False, print_fosc=False, verbose=False, cuda=True):
    assert opt is None and not half_prec and not cuda and abs(pgd_alpha - eps / 4) < 1e-12
    acc = authors_compare.reference_pgd_accuracy(model, batches, eps, attack_iters, n_restarts)
    return {wrong}, 0.0, None
'''


@pytest.mark.parametrize("wrong", [False, True])
def test_a_finished_run_beside_the_authors_code(tmp_path, tiny_run, capsys, wrong):
    """--run attacks a finished run's weights on the points of its final evaluation (ours repeats final.json's
    robust accuracy); --authors_code imports a checkout's utils.py (apex not installed) and times its rob_acc
    beside the restatement, saying whether the two robust accuracies agree. Here the checkout is a stand-in
    with the authors' signature that runs the restatement (or returns a wrong accuracy)."""
    run = tiny_run("--attack", "fgsm")
    authors = tmp_path / "authors"
    authors.mkdir()
    (authors / "utils.py").write_text(AUTHORS_UTILS.format(wrong="1.5" if wrong else "acc"))
    report = run_quick(tmp_path, "--run", run.run_dir, "--authors_code", str(authors))
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
    cases = {("--run", empty): "not a finished train.py run",
             ("--authors_code", empty): "no utils.py there",
             ("--authors_code", no_rob_acc): "has no rob_acc",
             ("--authors_code", broken): "importing its utils.py failed: ModuleNotFoundError",
             ("--run", damaged): "final.json is damaged",
             ("--budget_s", "-5"): "--budget_s must be a finite number",
             ("--out", tmp_path / "nodir" / "c.json"): "does not exist"}
    for argv, message in cases.items():
        r = cli("authors_compare.py", *common, *argv)
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
    theirs = authors_compare.reference_pgd_accuracy(model, [(x, y)], 16 / 255, 5, 3)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert calls == [40] * (3 * (5 + 1) + 1)  # 5 steps and a loss per restart, the final forward: full batches
    ours = utils.seeded_robust_accuracy(model.requires_grad_(False), [(x, y)], 16 / 255, 5, 3, seed=0)
    assert ours.pgd_acc <= theirs
