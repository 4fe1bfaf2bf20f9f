"""AutoAttack through torchattacks (autoattack_eval.py, eval.py --attack, train.py --final_autoattack).

CPU only, a one-layer CNN on 8x8 digits and a few dozen points. The in-process checks use a custom
budget (5 iterations, 100 Square queries): the wiring is the same at every budget, and the
standard budget's settings are checked on the attack objects themselves.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import autoattack_eval as aa
import eval as eval_py
import train
import utils
from tests.fixtures import FGSM_RUN, one_line, snapshot, trained_digits_cnn
from tests.fixtures import TINY as FIXTURE_TINY

torchattacks = pytest.importorskip("torchattacks")  # the optional extra: requirements-aa.txt
BUDGET = {"n_iters": 5, "square_queries": 100}


@pytest.fixture(scope="module")
def trained():
    """A one-layer CNN (8 filters) after 60 full-batch Adam steps on the first 1000 digits, in eval mode,
    and 32 held-out digits."""
    model, x, y = trained_digits_cnn()
    return model, x[1000:1032].clone(), y[1000:1032].clone()


class Saturated(torch.nn.Module):
    """Logits times 1e4: cross-entropy saturates (its input gradient is exactly 0 in fp32 wherever the
    margin exceeds ~0.01), while the decision is the model's. DLR is scale-invariant and still works."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1e4 * self.model(x)


class Quantised(torch.nn.Module):
    """Rounds every pixel to {0, 0.5, 1} first: the input gradient is 0 everywhere, so only a
    gradient-free search (Square) can find what flips the rounded input."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(2 * x) / 2)


def pgd_50_10(model, x, y, eps):
    torch.manual_seed(0)
    return utils.robust_accuracy(model, [(x, y)], eps, eps / 4, 50, 10)


def library_autoattack(model, x, y, eps, n_iters, square_queries) -> float:
    """torchattacks' own AutoAttack class (its APGD-CE, APGD-T, FAB-T, Square ensemble and early exit),
    with the iteration and query budget set on its attacks; accuracy at its adversarial points."""
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    for stage in attack._autoattack.attacks:
        if isinstance(stage, torchattacks.Square):
            stage.n_queries, stage.p_init, stage.rescale_schedule = square_queries, 0.8, False
        else:
            stage.steps = n_iters
    adv = attack(x, y)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


@pytest.mark.parametrize("masked, eps", [(False, 0.1), (True, 0.3)])
def test_autoattack_agrees_with_the_library_and_is_below_pgd(trained, masked, eps):
    # masked: the input is quantised, so its gradient is 0; APGD-T's random start breaks a few points,
    # and Square, the gradient-free stage, has to break the rest. Two batches there, one otherwise.
    model, x, y = trained
    model = Quantised(model).eval() if masked else model
    batches = [(x[:16], y[:16]), (x[16:], y[16:])] if masked else [(x, y)]
    ours = aa.attack_accuracy(model, batches, eps, "autoattack", seed=0, **BUDGET)
    lib = sum(library_autoattack(model, xb, yb, eps, **BUDGET) * len(yb) for xb, yb in batches) / len(y)
    pgd = pgd_50_10(model, x, y, eps)
    assert abs(ours.robust_acc - lib) <= 0.01, (ours.stage_acc, lib)
    assert ours.clean_acc == pgd.clean_acc
    assert ours.robust_acc <= pgd.pgd_acc
    stages = list(ours.stage_acc.values())
    assert list(ours.stage_acc) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert stages == sorted(stages, reverse=True) and stages[-1] == ours.robust_acc
    assert (ours.n_eval, ours.version, ours.library) == (32, "custom", f"torchattacks {torchattacks.__version__}")
    n_correct = round(ours.clean_acc * 32)
    if masked:
        assert ours.stage_acc["square"] <= ours.stage_acc["fab-t"] - 0.3  # the gradient-free stage did the work
        assert ours.robust_acc <= pgd.pgd_acc - 0.3
    else:
        assert 0 < ours.robust_acc < ours.clean_acc
        # early exit: every clean-correct point takes APGD-CE's steps (+ its first gradient), later stages
        # only the points still robust: APGD-T and FAB-T take 9 targets x (steps + 1) passes each
        n_robust = round(ours.robust_acc * 32)
        assert ours.grad_passes == n_correct * 6 + n_robust * 9 * 6 + n_robust * 9 * 5, ours.grad_passes


def test_saturated_cross_entropy_fools_pgd_but_not_autoattack(trained):
    # Standard budget: APGD-CE is as blind as PGD, APGD-T (DLR loss) breaks the points; nothing is left
    # for Square, so the standard version stays fast here.
    model, x, y = trained
    masked = Saturated(model).eval()
    eps = 0.2
    pgd = pgd_50_10(masked, x, y, eps)
    ours = aa.attack_accuracy(masked, [(x, y)], eps, "autoattack", seed=0)
    assert pgd_50_10(model, x, y, eps).pgd_acc <= 0.1  # without the masking, PGD breaks these points
    assert pgd.pgd_acc >= 0.75 and ours.stage_acc["apgd-ce"] >= 0.75
    assert ours.robust_acc <= pgd.pgd_acc - 0.5 and ours.version == "standard"
    assert ours.stage_acc["apgd-t"] == ours.robust_acc


def test_single_attacks_rng_and_model_mode(trained):
    model, x, y = trained
    model.train()  # the caller's choice stands: the library's mode switches never reach the model
    rng = torch.get_rng_state()
    ce = aa.attack_accuracy(model, [(x, y)], 0.1, "apgd-ce", seed=0)
    t = aa.attack_accuracy(model, [(x, y)], 0.1, "apgd-t", seed=0, n_iters=10)
    assert model.training
    model.eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(ce.stage_acc) == ["apgd-ce"] and list(t.stage_acc) == ["apgd-t"]
    assert ce.robust_acc < ce.clean_acc and t.robust_acc < t.clean_acc
    assert ce.grad_passes == round(ce.clean_acc * 32) * 101  # 100 steps + the first gradient, one restart
    assert set(ce.json_fields()) == {"attack", "attack_version", "attack_stages", "attack_library", "apgd_ce_acc",
                                     "apgd_ce_stage_acc", "apgd_ce_grad_passes_per_example",
                                     "apgd_ce_forward_passes_per_example"}


def test_standard_budget_reaches_the_library(trained):
    model, _, _ = trained
    lib = aa.load_library()
    built = {name: aa._build_stage(lib, name, model, 0.1, 10, 0, aa.N_ITERS, aa.SQUARE_QUERIES)
             for name in aa.STAGES["autoattack"]}
    assert [built[n].steps for n in ("apgd-ce", "apgd-t", "fab-t")] == [100, 100, 100]
    assert built["apgd-ce"].loss == "ce" and built["fab-t"].multi_targeted
    assert built["apgd-t"].n_target_classes == built["fab-t"].n_target_classes == 9
    sq = built["square"]
    assert (sq.n_queries, sq.p_init, sq.rescale_schedule, sq.loss) == (5000, 0.8, False, "margin")
    assert all(b.n_restarts == 1 and b.eps == 0.1 and b.seed == 0 for b in built.values())
    four_class = aa._build_stage(lib, "apgd-t", model, 0.1, 4, 0, aa.N_ITERS, aa.SQUARE_QUERIES)
    assert four_class.n_target_classes == 3
    with pytest.raises(ValueError, match="at least 4 classes"):  # DLR needs 4 logits: binary data sets
        aa.attack_accuracy(model, [], 0.1, "autoattack", n_classes=2)
    with pytest.raises(SystemExit):
        train.parse_config(["--dataset", "cifar10_binary", "--final_autoattack"])


# ------------------------------------------------------------------------------- the entry points
TINY = ["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76", "--epochs", "1",
        "--batch_size", "350", "--n_eval_every_k_iter", "350", "--eval_iter_freq", "2", "--lr_max", "0.01",
        "--attack_iters", "2", "--n_final_eval", "48", "--batch_size_eval", "48", "--clamp_grad", "half",
        "--device", "cpu", "--eval_early_stopped_model"]


def test_final_autoattack_and_eval_attack(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert train.main(TINY + ["--out_dir", out]) == 0
    (name,) = os.listdir(out)
    run_dir = os.path.join(out, name)
    final_path, model_path = os.path.join(run_dir, "final.json"), os.path.join(run_dir, "model.pth")
    before = json.load(open(final_path))
    assert "autoattack" not in before and not any(k.startswith("aa_") for k in before["last"])  # only when asked
    weights = open(model_path, "rb").read()
    # relaunched with --final_autoattack, the finished run gets AutoAttack from model.pth, no retraining
    assert train.main(TINY + ["--out_dir", out, "--final_autoattack"]) == 0
    after = json.load(open(final_path))
    assert open(model_path, "rb").read() == weights
    assert after["autoattack"] == {"attack": "autoattack", "attack_version": "standard",
                                   "attack_stages": ["apgd-ce", "apgd-t", "fab-t", "square"],
                                   "attack_library": f"torchattacks {torchattacks.__version__}"}
    for key in ("last", "best"):
        assert {k: v for k, v in after[key].items() if not k.startswith("aa_")} == before[key]
        assert 0 <= after[key]["aa_acc"] <= after[key]["pgd_acc"]
        assert after[key]["aa_grad_passes_per_example"] > 0
    assert "AutoAttack added" in open(os.path.join(run_dir, "log.txt")).read()
    # a fresh run with the flag writes the same numbers (AutoAttack leaves the other fields' random draws alone)
    fresh = str(tmp_path / "fresh")
    assert train.main(TINY + ["--out_dir", fresh, "--final_autoattack"]) == 0
    again = json.load(open(os.path.join(fresh, name, "final.json")))
    keys = ("last", "best", "autoattack")
    assert {k: again[k] for k in keys} == {k: after[k] for k in keys}
    # eval.py --attack autoattack on the same points and seed reproduces final.json
    capsys.readouterr()
    common = ["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76", "--model_path",
              model_path, "--n_eval", "48", "--batch_size_eval", "48", "--device", "cpu", "--seed", "0"]
    assert eval_py.main(common + ["--attack", "autoattack"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert (result["pgd_acc"], result["aa_acc"]) == (after["last"]["pgd_acc"], after["last"]["aa_acc"])
    assert result["aa_stage_acc"] == after["last"]["aa_stage_acc"]
    assert (result["attack"], result["attack_version"]) == ("autoattack", "standard")
    assert "autoattack (standard, torchattacks" in captured.err
    assert eval_py.main(common + ["--attack_iters", "1", "--n_restarts", "1"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not {k for k in plain if k.startswith(("aa_", "apgd_", "attack_library"))} and "attack" not in plain


def test_missing_library_is_a_one_line_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torchattacks", None)  # as if not installed
    assert not aa.available()
    code = eval_py.main(["--dataset", "digits", "--model", "cnn", "--model_path", str(tmp_path / "absent.pth"),
                         "--attack", "autoattack", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "torchattacks" in err and "pip install --no-deps -r requirements-aa.txt" in err
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out_dir", str(tmp_path / "runs"), "--final_autoattack"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "requirements-aa.txt" in err
    assert not os.path.exists(tmp_path / "runs")
    with pytest.raises(aa.AttackUnavailable):
        aa.attack_accuracy(torch.nn.Identity(), [], 0.1)


@pytest.mark.parametrize("damage", ["torn final.json", "no model.pth", "torn model.pth"])
def test_final_autoattack_on_a_damaged_finished_run_is_one_line_and_changes_nothing(finished, tmp_path, cli, damage):
    run_dir = os.path.join(tmp_path, "runs", os.path.basename(finished))
    shutil.copytree(finished, run_dir)
    name = damage.split()[-1]
    path = os.path.join(run_dir, name)
    if damage.startswith("torn"):
        with open(path, "rb") as f:
            whole = f.read()
        with open(path, "wb") as f:
            f.write(whole[: len(whole) // 2])
    else:
        os.remove(path)
    before = snapshot(tmp_path)
    proc = cli("train.py", *FIXTURE_TINY, *FGSM_RUN, "--out_dir", tmp_path / "runs", "--final_autoattack")
    assert proc.code == 2 and snapshot(tmp_path) == before
    line = one_line(proc.err)
    expected = {"torn final.json": f"train.py: error: {path} is damaged (not whole JSON: truncated?); relaunch its "
                                   "command with --overwrite to retrain the run",
                "no model.pth": f"train.py: error: cannot add AutoAttack: {path} is missing (final.json is there); "
                                "restore it, or rerun with --overwrite to retrain",
                "torn model.pth": f"train.py: error: cannot read checkpoint {path} ("}[damage]
    assert line.startswith(expected) and line.endswith("--overwrite to retrain" + ("" if "final" not in damage
                                                                                     else " the run"))
