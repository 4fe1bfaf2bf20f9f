"""The successor methods inside train.py: flags, run names, the regulariser hook in train_step, and
one-epoch runs on digits and on tiny CIFAR-10-format files (CPU, a few seconds in all)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import models
import precision
import rundir
import train
import utils
from tests.fixtures import TINY, write_cifar10

NEW_METHODS = {
    "nfgsm": ["--attack", "nfgsm"],
    "zerograd": ["--attack", "fgsm", "--zerograd_q", "0.35", "--fgsm_alpha", "2"],
    "elle": ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "100"],
    "elle_a": ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "100",
               "--elle_adaptive"],
    "gradalign_graph": ["--attack", "fgsm", "--attack_init", "zero", "--grad_align_cos_lambda", "1",
                        "--grad_align_grad1", "graph"],
    "gradalign_every_fd": ["--attack", "pgd", "--pgd_train_n_iters", "1", "--grad_align_cos_lambda", "1",
                           "--grad_align_every", "2", "--grad_align_fd", "0.01"],
}


def _check_run_dir(run_dir: str, n_eval: int) -> dict:
    for name in ("config.json", "metrics.jsonl", "model.pth", "final.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1 and final["n_eval"] == n_eval
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows and all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN
    return {"final": final, "rows": rows, "config": json.load(open(os.path.join(run_dir, "config.json")))}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_every_new_method_trains_one_epoch_on_digits(tmp_path, method):
    args = TINY + ["--out_dir", str(tmp_path), *NEW_METHODS[method]]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    out = _check_run_dir(os.path.join(tmp_path, train.run_name(cfg, defaults)), 64)
    if method != "elle_a":  # ELLE-A's lambda is 0 until an error spike
        assert any(r["train_reg"] > 0 for r in out["rows"][1:]) == method.startswith(("elle", "gradalign"))
    if method == "nfgsm":
        assert out["config"]["fgsm_alpha"] == 1.0 and out["config"]["nfgsm_noise_mult"] == 2.0


def test_every_new_method_trains_one_epoch_on_cifar10_files(tmp_path):
    write_cifar10(tmp_path / "data", [[0, 1, 2, 3]] * 5, [4, 5, 6, 7])
    for method, flags in NEW_METHODS.items():
        args = ["--dataset", "cifar10", "--data_dir", str(tmp_path / "data"), "--model", "cnn", "--n_filters_cnn",
                "2", "--epochs", "1", "--batch_size", "10", "--n_eval_every_k_iter", "10", "--eval_iter_freq", "1",
                "--attack_iters", "1", "--n_final_eval", "4", "--device", "cpu", "--debug",
                "--out_dir", str(tmp_path / "runs"), *flags]
        assert train.main(args) == 0, method
        cfg, defaults = train.parse_config(args)
        _check_run_dir(os.path.join(tmp_path / "runs", train.run_name(cfg, defaults)), 4)


# ------------------------------------------------------------------------------------------ run names
def test_defaults_leave_run_names_alone_and_each_new_setting_is_named():
    base, defaults = train.parse_config(TINY)
    name = train.run_name(base, defaults)
    for short in ("nk", "zq", "elle", "g1", "gaev", "gafd"):
        assert f"_{short}" not in name
    # --fgsm_alpha's default is still 1.25 for fgsm: an explicit 1.25 changes nothing
    assert train.run_name(train.parse_config(TINY + ["--fgsm_alpha", "1.25"])[0], defaults) == name
    names = {name}
    for flags in (["--attack", "nfgsm"], ["--attack", "nfgsm", "--nfgsm_noise_mult", "1"],
                  ["--attack", "nfgsm", "--fgsm_alpha", "1.25"], ["--zerograd_q", "0.35"], ["--elle_lambda", "10"],
                  ["--elle_lambda", "10", "--elle_adaptive"], ["--grad_align_cos_lambda", "1"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_grad1", "graph"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_every", "4"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_fd", "0.001"]):
        cfg, flag_defaults = train.parse_config(TINY + flags)
        new = train.run_name(cfg, flag_defaults)
        assert new not in names, flags
        names.add(new)
    # N-FGSM's own default step is 1.0: named only when it differs
    cfg, flag_defaults = train.parse_config(TINY + ["--attack", "nfgsm"])
    assert cfg.fgsm_alpha == 1.0 and "_fa" not in train.run_name(cfg, flag_defaults)


@pytest.mark.parametrize("flags, fragment", [
    (["--nfgsm_noise_mult", "3"], "--nfgsm_noise_mult needs --attack nfgsm"),
    (["--attack", "nfgsm", "--nfgsm_noise_mult", "-1"], "--nfgsm_noise_mult must be"),
    (["--zerograd_q", "1"], "--zerograd_q must be in [0, 1)"),
    (["--attack", "pgd", "--zerograd_q", "0.3"], "--zerograd_q needs --attack fgsm"),
    (["--zerograd_q", "0.3", "--minibatch_replay", "2"], "--zerograd_q needs"),
    (["--elle_lambda", "-1"], "--elle_lambda must be"),
    (["--elle_adaptive"], "--elle_adaptive needs --elle_lambda"),
    (["--elle_lambda", "10", "--grad_align_cos_lambda", "1"], "use one of them"),
    (["--grad_align_every", "2"], "need --grad_align_cos_lambda"),
    (["--grad_align_grad1", "graph"], "need --grad_align_cos_lambda"),
    (["--grad_align_cos_lambda", "1", "--grad_align_every", "0"], "--grad_align_every must be"),
    (["--grad_align_cos_lambda", "1", "--grad_align_fd", "-0.1"], "--grad_align_fd must be"),
    (["--grad_align_grad1", "both"], "invalid choice"),
])
def test_bad_method_flags_are_one_line_exit_2(capsys, flags, fragment):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(TINY + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


# --------------------------------------------------------------------------------- the training step
def _step_setup(*flags: str, seed: int = 0):
    cfg, _ = train.parse_config(TINY + list(flags))
    torch.manual_seed(seed)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    return cfg, model, x, y


def _param_grad_after_step(*flags: str) -> torch.Tensor:
    cfg, model, x, y = _step_setup(*flags)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the gradients in .grad
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")), update=True)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_grad1_graph_changes_the_parameter_gradient():
    base = ["--attack", "fgsm", "--attack_init", "zero", "--grad_align_cos_lambda", "1"]
    detached = _param_grad_after_step(*base)
    again = _param_grad_after_step(*base, "--grad_align_grad1", "detached")
    graph = _param_grad_after_step(*base, "--grad_align_grad1", "graph")
    assert torch.equal(detached, again)  # fgsm's default is detached
    assert not torch.allclose(detached, graph, rtol=1e-3, atol=1e-7)
    # without the regulariser the flag changes nothing (the step's delta uses the same gradient)
    plain = ["--attack", "fgsm", "--attack_init", "zero", "--grad_align_cos_lambda", "1e-12"]
    assert torch.allclose(_param_grad_after_step(*plain),
                          _param_grad_after_step(*plain, "--grad_align_grad1", "graph"), atol=1e-6)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_grad_align_every_k_regularises_exactly_every_kth_iteration(attack):
    cfg, model, x, y = _step_setup("--attack", attack, "--pgd_train_n_iters", "1", "--grad_align_cos_lambda", "1",
                                   "--grad_align_every", "3")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats, st = train.Stats(torch.device("cpu")), train.StepState()
    applied = []
    for i in range(7):
        st.iteration = i
        before = float(stats.sums[1])
        train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
        applied.append(float(stats.sums[1]) > before)
    assert applied == [i % 3 == 0 for i in range(7)]


def test_elle_adaptive_lambda_is_applied_in_the_step():
    cfg, model, x, y = _step_setup("--attack", "fgsm", "--attack_init", "zero", "--elle_lambda", "50",
                                   "--elle_adaptive")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train.Stats(torch.device("cpu"))
    st = train.StepState()  # the first step creates ELLE-A's lambda rule (methods.py)
    for _ in range(4):
        train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
    elle = st.states["elle"]
    assert isinstance(elle, utils.ElleAdaptive) and elle.lam_max == 50.0
    assert float(stats.sums[1]) == 0.0 and elle.count == 4  # lambda starts at 0
    elle.mean.fill_(-1.0)  # every earlier error far below this one: a spike
    train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
    assert float(elle.lam) == 50.0 and float(stats.sums[1]) == 0.0  # set now, applied from the next step
    train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
    assert float(stats.sums[1]) > 0


def test_elle_adaptive_state_survives_a_resume(tmp_path):
    cfg, _ = train.parse_config(TINY + ["--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "4000",
                                        "--elle_adaptive"])

    def loop() -> train.Loop:
        model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
        step = train.StepState(device=torch.device("cpu"))
        step.select(cfg)
        return train.Loop(cfg=cfg, run_dir=str(tmp_path), model=model, fwd_model=model,
                          opt=torch.optim.Adam(model.parameters()), scaler=torch.amp.GradScaler("cpu", enabled=False),
                          guard=precision.FiniteGuard(False, torch.device("cpu")), step=step,
                          best_state=model.state_dict())
    before = loop()
    for value in (1.0, 1.1, 0.9, 5.0):
        before.step.states["elle"].update(torch.tensor(value))
    generator = torch.Generator().manual_seed(0)
    rundir.save_resume_state(str(tmp_path), before.resume_state(), generator)
    after = loop()
    after.restore(rundir.load_resume_state(str(tmp_path), generator))
    elle_before, elle_after = before.step.states["elle"], after.step.states["elle"]
    assert elle_after.count == 4 and float(elle_after.lam) == 4000.0
    assert float(elle_after.update(torch.tensor(1.0))) == float(elle_before.update(torch.tensor(1.0)))
    assert float(elle_after.mean) == float(elle_before.mean)
