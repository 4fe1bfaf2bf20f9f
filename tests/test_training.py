"""Training and resume on the embedded digits data and tiny files in the datasets' formats (CPU,
in-process): every method end to end, determinism, each method's step against restatements of its
authors' update, the protocols' schedules and models, the details of the authors' training loop that
move results (docs/fidelity.md), NaN losses, and the fp16 passes redone in fp32.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import config
import methods
import models
import precision
import rundir
import train
import utils
from tests.faulty_train import injected
from tests.fixtures import (
    ROOT,
    RUN,
    TINY,
    Interrupt,
    read_metrics,
    run_dir_of,
    run_train,
    stop_after_epoch,
    write_cifar10,
)

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


SHAPE = (3, 6, 6)  # d = 108: the quantile's interpolation and floor(q d) zero different counts (38 vs 37)


def _perturb(model, x, y, cfg):
    """The training perturbation that train_step would take for cfg (methods.py's registry)."""
    st = train.StepState()
    st.select(cfg)
    return st.perturbation.perturb(model, x, y, cfg, st)


def _saturated_batch(seed: int, b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with about a third of the pixels at exactly 0, a third at exactly 1, the rest inside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *SHAPE, generator=g)
    pick = torch.rand(b, *SHAPE, generator=g)
    x = torch.where(pick < 1 / 3, torch.zeros_like(x), torch.where(pick > 2 / 3, torch.ones_like(x), x))
    return x, torch.randint(0, 10, (b,), generator=g)


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model("cnn", 10, SHAPE, 2, 8)


def _cfg(*flags: str):
    return train.parse_config(TINY + list(flags))[0]


def _mean_ce_grad(model: nn.Module, point: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The authors' gradient: their batch-mean cross-entropy differentiated at `point` itself."""
    point = point.clone().requires_grad_(True)
    F.cross_entropy(model(point), y).backward()
    return point.grad.detach()


# --------------------------------------------------------------------------------------------- ELLE
def _elle_official(model, x, y, eps):
    """ELLE's released attack (no input noise, one step of eps): x_adv = x + eps * sign(gradient at x);
    no clip to the ball and no box. This repo then projects x_adv onto the box [0, 1]."""
    return x + eps * torch.sign(_mean_ce_grad(model, x, y))


@pytest.mark.parametrize("rule", utils.CLAMP_RULES)
def test_elle_fgsm_step_is_the_official_one_at_saturated_pixels(rule):
    model, (x, y) = _cnn(0), _saturated_batch(0)
    eps = 0.1
    cfg = _cfg("--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "1000",
               "--clamp_grad", rule, "--eps", str(eps * 255))
    pert = _perturb(model, x, y, cfg)
    official = _elle_official(model, x, y, cfg.eps_frac)
    assert torch.equal(x + pert.delta, torch.clamp(official, 0.0, 1.0))
    # the saturated pixels the official step moves into the box do move here too
    moved_in = ((x == 0) & (official > 0)) | ((x == 1) & (official < 1))
    assert moved_in.sum() > 50 and bool((pert.delta[moved_in] != 0).all())


# ----------------------------------------------------------------------------------------- ZeroGrad
def _zerograd_official(model, x, y, start, eps, alpha, q):
    """ZeroGrad's released attack from the uniform start `start`: project the start onto the box,
    take the gradient at that point (nothing clamped in the graph), zero every coordinate whose |g| is
    below the example's torch.quantile(|g|, q), step alpha * sign, clip to [-eps, eps], project onto
    the box."""
    lo, hi = -x, 1 - x
    delta = torch.max(torch.min(start, hi), lo)
    g = _mean_ce_grad(model, x + delta, y)
    threshold = torch.quantile(g.abs().view(len(g), -1), q, dim=1).view(-1, 1, 1, 1)
    g[g.abs() < threshold] = 0
    delta = torch.clamp(delta + alpha * torch.sign(g), -eps, eps)
    return torch.max(torch.min(delta, hi), lo)


@pytest.mark.parametrize("rule", utils.CLAMP_RULES)
def test_zerograd_step_is_the_official_one_at_saturated_pixels(rule):
    model, (x, y) = _cnn(1), _saturated_batch(1)
    eps, q = 0.1, 0.35
    cfg = _cfg("--attack", "fgsm", "--attack_init", "random", "--fgsm_alpha", "2", "--zerograd_q", str(q),
               "--clamp_grad", rule, "--eps", str(eps * 255))
    torch.manual_seed(5)
    pert = _perturb(model, x, y, cfg)
    torch.manual_seed(5)
    start = torch.empty_like(x).uniform_(-cfg.eps_frac, cfg.eps_frac)  # the same draw as the training step
    official = _zerograd_official(model, x, y, start, cfg.eps_frac, 2 * cfg.eps_frac, q)
    left_box = ((x + start) < 0) | ((x + start) > 1)
    assert left_box.float().mean() > 0.2  # many starts fell outside the box: the case that differed
    # a coordinate with another sign, or zeroed on one side only, would differ by about eps
    assert torch.allclose(pert.delta, official, atol=1e-6, rtol=0)
    assert (pert.delta - pert.start).abs().gt(0).sum() > 0.5 * x.numel()


def test_zero_smallest_matches_torch_quantile_and_its_count():
    torch.manual_seed(2)
    grad = torch.randn(6, *SHAPE)
    grad[1] *= 100  # the quantile is per example
    for q in (0.1, 0.35, 0.45, 0.7, 0.9):
        out = utils.zero_smallest(grad, q)
        flat = grad.flatten(1)
        d = flat.shape[1]
        threshold = torch.quantile(flat.abs(), q, dim=1, keepdim=True)
        assert torch.equal(out.flatten(1), torch.where(flat.abs() < threshold, 0.0, flat))
        count = int(np.ceil(q * (d - 1)))  # linear interpolation: the values strictly below
        assert all(int((row == 0).sum()) == count for row in out.flatten(1))
        for g, o in zip(flat, out.flatten(1)):
            order = g.abs().argsort()
            assert torch.equal(o[order[count:]], g[order[count:]])  # the larger ones are untouched
    assert utils.zero_smallest(grad, 0.0) is grad
    with pytest.raises(ValueError, match="quantile"):
        utils.zero_smallest(grad, 1.0)


# ------------------------------------------------------------------------------------------- ELLE-A
def _elle_a_official(errors: list[float], lam_max: float) -> list[float]:
    """The lambda each step's loss is multiplied by in ELLE-A's released training loop: the rule runs
    after the backward, so a lambda set from step t's error scales step t + 1. The rule: lam_max when
    the error exceeds the mean plus 2 (population) standard deviations of every earlier error, given
    more than 2 of them, otherwise 0.99 times the previous lambda; lambda starts at 0."""
    lam, seen, used = 0.0, [], []
    for err in errors:
        used.append(lam)
        if len(seen) > 2 and err > np.mean(seen) + 2 * np.std(seen):
            lam = lam_max
        else:
            lam *= 0.99
        seen.append(err)
    return used


def test_elle_a_lambda_applies_from_the_next_step():
    rng = np.random.default_rng(0)
    errors = list(1 + 0.05 * rng.standard_normal(40))
    errors[10] = errors[25] = errors[26] = 3.0  # spikes, two in a row
    rule = utils.ElleAdaptive(lam_max=4000.0)
    ours = [float(rule.update(torch.tensor(e))) for e in errors]
    assert ours == pytest.approx(_elle_a_official(errors, 4000.0), rel=1e-5)
    assert ours[10] < 4000.0 and ours[11] == 4000.0  # the spike at step 10 first acts at step 11
    assert ours[0] == 0.0


# ------------------------------------------------------------------------- GradAlign, finite difference
def _smooth_bn_cnn(seed: int) -> nn.Module:
    """conv -> BatchNorm (train mode: batch statistics couple the examples) -> softplus -> linear, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double().train()


def _relative_errors(model, x, y, eta, hs, with_grad1):
    params = list(model.parameters())
    start = torch.zeros_like(x)
    g1_graph, _ = utils.input_grad(model, x, y, start, create_graph=with_grad1)
    g2_graph, _ = utils.input_grad(model, x, y, eta, create_graph=True)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(utils.grad_align_reg(g1_graph, g2_graph, 1.0),
                                                                params)])
    errors = []
    for h in hs:
        reg = utils.grad_align_reg_fd(model, x, y, g1_graph.detach(), g2_graph.detach(), eta, 1.0, h,
                                      delta1=start if with_grad1 else None)
        fd = torch.cat([g.flatten() for g in torch.autograd.grad(reg, params)])
        errors.append(float((fd - exact).norm() / exact.norm()))
    return errors


@pytest.mark.parametrize("with_grad1", [False, True])
def test_grad_align_fd_converges_with_train_mode_batchnorm(with_grad1):
    model = _smooth_bn_cnn(9)
    g = torch.Generator().manual_seed(9)
    x = torch.rand(16, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    eta = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.1
    errors = _relative_errors(model, x, y, eta, (1e-1, 1e-2, 1e-3), with_grad1)
    # O(h^2): about 100 times smaller per step, down to the fp32 cosine's rounding
    assert errors[0] > 10 * errors[1] > 100 * errors[2], errors
    assert errors[2] < 1e-5, errors


# ------------------------------------------------------------------------------ CIFAR-100, WRN-28-10
def _tiny_cifar100_run(tmp_path, model: str, *extra: str) -> str:
    import json
    import os

    from tests.fixtures import write_cifar100
    write_cifar100(tmp_path / "data", list(range(0, 100, 12)), [3, 50, 97, 12])  # 9 training, 4 test images
    out = tmp_path / "runs"
    args = ["--dataset", "cifar100", "--data_dir", str(tmp_path / "data"), "--model", model, "--epochs", "1",
            "--batch_size", "4", "--n_eval_every_k_iter", "4", "--eval_iter_freq", "2", "--attack_iters", "1",
            "--n_final_eval", "2", "--batch_size_eval", "2", "--device", "cpu", "--debug", "--out_dir", str(out),
            "--attack", "fgsm", "--attack_init", "zero", *extra]
    assert train.main(args) == 0
    (name,) = os.listdir(out)
    run_dir = out / name
    for file in ("config.json", "metrics.jsonl", "model.pth", "final.json"):
        assert os.path.getsize(run_dir / file) > 0, file
    config = json.load(open(run_dir / "config.json"))
    assert (config["dataset"], config["model"]) == ("cifar100", model)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 2]  # epoch 0's iteration, then the 2 of epoch 1
    final = json.load(open(run_dir / "final.json"))
    assert final["n_eval"] == 2 and 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1
    return str(run_dir)


def test_one_epoch_on_tiny_cifar100_writes_a_run(tmp_path):
    run_dir = _tiny_cifar100_run(tmp_path, "cnn")
    weights = torch.load(f"{run_dir}/model.pth", weights_only=True)["last"]
    assert weights["_model.3.weight"].shape[0] == 100  # a 100-class head


def test_one_epoch_of_the_wide_network_on_tiny_cifar100_writes_a_run(tmp_path):
    # WRN-10-2 (the class of wrn28_10 at --wrn_depth 10 --wrn_width 2): WRN-28-10's 36.5M parameters
    # take about a minute on the CPU, and test_models checks its keys and shapes
    run_dir = _tiny_cifar100_run(tmp_path, "wrn28_10", "--wrn_depth", "10", "--wrn_width", "2")
    weights = torch.load(f"{run_dir}/model.pth", weights_only=True)["last"]
    assert weights["fc.weight"].shape == (100, 128)
    fresh = models.build_model("wrn28_10", 100, (3, 32, 32), wrn_depth=10, wrn_width=2)
    assert weights.keys() == fresh.state_dict().keys()


# -------------------------------------------------------------------------------------- schedule
def test_lr_peak_default_is_the_papers_floor_of_two_fifths():
    for epochs in range(1, 61):
        top = epochs * 2 // 5
        for t in np.linspace(0, epochs, 37):
            expected = float(np.interp(t, [0, top, epochs], [0, 0.2, 0]))
            assert train.lr_at(t, "cyclic", 0.2, epochs) == expected
            assert train.lr_at(t, "cyclic", 0.2, epochs, 0.4) == expected


def test_lr_peak_half_peaks_at_mid_training():
    for epochs in (2, 10, 30):
        assert train.lr_at(epochs / 2, "cyclic", 0.2, epochs, 0.5) == pytest.approx(0.2)
        assert train.lr_at(epochs / 2 - 0.25, "cyclic", 0.2, epochs, 0.5) < 0.2
        assert train.lr_at(epochs / 2 + 0.25, "cyclic", 0.2, epochs, 0.5) < 0.2
    assert train.lr_at(7, "cyclic", 1.0, 15, 0.5) == 1.0  # floor(7.5): ZeroGrad's epochs // 2


# --------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("name, channels, size", [("resnet18", 3, 32), ("cnn", 3, 8), ("cnn_bn", 3, 8)])
def test_normalize_equals_the_plain_model_on_normalised_input(name, channels, size):
    torch.manual_seed(0)
    plain = models.build_model(name, 10, (channels, size, size), 1, 4).eval()
    torch.manual_seed(0)
    normed = models.build_model(name, 10, (channels, size, size), 1, 4, normalize="cifar10").eval()
    assert list(normed.state_dict()) == list(plain.state_dict())
    x = torch.rand(4, channels, size, size)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in models.NORMALIZATIONS["cifar10"])
    torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_normalize_on_a_wide_resnet_keeps_its_keys():
    torch.manual_seed(0)
    plain = models.WideResNet(10, depth=10, width=1).eval()
    torch.manual_seed(0)
    normed = models.WideResNet(10, depth=10, width=1).eval()
    models.set_normalization(normed, "svhn")
    assert list(normed.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in models.NORMALIZATIONS["svhn"])
    torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_an_authors_state_dict_loads_into_a_normalised_model():
    source = models.build_model("resnet18", 10, (3, 32, 32))
    target = models.build_model("resnet18", 10, (3, 32, 32), normalize="cifar10")
    models.load_state(target, source.state_dict())
    assert torch.equal(target.normalize.std, torch.tensor(models.NORMALIZATIONS["cifar10"][1]).view(1, -1, 1, 1))


# ---------------------------------------------------------------------------- the training step
def _setup(*flags: str):
    cfg, _ = train.parse_config(TINY + ["--model", "cnn_bn"] + list(flags))
    torch.manual_seed(0)
    model = models.build_model("cnn_bn", 10, (1, 8, 8), 1, 4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return cfg, model, x, y, opt, torch.amp.GradScaler("cpu", enabled=False)


def _bn_state(model) -> list[torch.Tensor]:
    return [v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k]


def test_clean_forward_is_one_more_train_mode_forward_at_x_at_the_end_of_the_step():
    elle = ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "10"]
    cfg, model, x, y, opt, scaler = _setup(*elle, "--clean_forward")
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")), update=False)
    with_clean = _bn_state(model)
    cfg, model, x, y, opt, scaler = _setup(*elle)
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")), update=False)
    without = _bn_state(model)
    with torch.no_grad():
        model(x)  # the same forward, after the step
    assert any(not torch.equal(a, b) for a, b in zip(with_clean, without))
    for a, b in zip(with_clean, _bn_state(model)):
        assert torch.equal(a, b)


def test_elle_a_statistics_start_at_the_first_training_step():
    cfg, model, x, y, opt, scaler = _setup("--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1",
                                           "--elle_lambda", "50", "--elle_adaptive")
    st, stats = train.StepState(), train.Stats(torch.device("cpu"))
    train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=False)  # epoch 0's iteration
    rule = st.states["elle"]
    assert rule.count == 0 and rule.lam is None and float(stats.sums[1]) == 0.0
    errors = []
    for _ in range(3):
        torch.manual_seed(len(errors))
        errors.append(float(utils.elle_error(model, x, y, cfg.eps_frac).detach()))
        torch.manual_seed(len(errors) - 1)
        train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
    assert rule.count == 3
    assert float(rule.mean) == pytest.approx(np.mean(errors), rel=1e-5)  # the training steps' errors only


# -------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe, eps, dataset, model, word", [
    ("nfgsm", 16, "cifar10", "wrn28_10", "--nfgsm_noise_mult=4"),
    ("nfgsm", 16, "cifar10", "resnet18", "--nfgsm_noise_mult=2"),
    ("nfgsm", 14, "cifar10", "wrn28_10", "--nfgsm_noise_mult=2"),
    ("nfgsm", 12, "svhn", "resnet18", "--nfgsm_noise_mult=3"),
    ("nfgsm", 8, "svhn", "resnet18", "--nfgsm_noise_mult=2"),
    ("zerograd", 8, "svhn", "resnet18", "--zerograd_q=0.7"),
    ("zerograd", 8, "cifar100", "resnet18", "--zerograd_q=0.45"),
    ("zerograd", 8, "cifar10", "resnet18", "--zerograd_q=0.35"),
])
def test_recipe_settings_of_the_official_scripts(recipe, eps, dataset, model, word):
    assert word in methods.flags(recipe, eps, dataset, model)


def test_schedules_of_cifar100_and_of_zerograd_on_svhn():
    assert methods.flags("nfgsm", 8, "cifar100")[-2:] == ["--epochs=30", "--lr_max=0.2"]
    assert methods.flags("zerograd", 8, "svhn")[-2:] == ["--epochs=15", "--lr_max=0.01"]
    assert methods.flags("fgsm", 8, "svhn")[-2:] == ["--epochs=15", "--lr_max=0.05"]


# ---------------------------------------------------------------------------- the sweep and report
@pytest.mark.slow
def test_cifar10_sweep_runs_either_protocol():
    def dry(protocol: str) -> list[str]:
        env = {**os.environ, "DRY_RUN": "1", "PROTOCOL": protocol, "METHODS": "fgsm nfgsm elle_a", "EPS": "8",
               "SEEDS": "0"}
        return subprocess.run(["bash", "sh/exps_diff_eps_cifar10.sh"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout.splitlines()
    paper, own = dry("paper"), dry("own")
    assert len(paper) == len(own) == 3
    names = {}
    for protocol, lines in (("paper", paper), ("own", own)):
        for line in lines:
            cfg, defaults = config.parse_config(line.split()[2:])  # every command passes the checks
            names[protocol, cfg.attack if cfg.elle_lambda == 0 else "elle_a"] = rundir.run_name(cfg, defaults)
    assert names["own", "fgsm"] == names["paper", "fgsm"]  # the paper's method: the same run
    # fp32 instead of hp, the protocol named before the seed, and the authors' network after the dataset
    for method, network in (("nfgsm", "resnet18_nfgsm"), ("elle_a", "resnet18_rice")):
        paper_parts = [p for p in names["paper", method].split("_") if p != "hp"]
        own_name = "_".join(paper_parts[:-1] + ["protoown", paper_parts[-1]])
        assert names["own", method] == own_name.replace("cifar10_resnet18_", f"cifar10_{network}_", 1)
    assert all("--half_prec" in line for line in paper)
    bad = subprocess.run(["bash", "sh/exps_diff_eps_cifar10.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "PROTOCOL": "ours"})
    assert bad.returncode == 2 and "unknown PROTOCOL 'ours'" in bad.stderr


# ------------------------------------------------------------------------------------ resume.pt
# The keys of resume.pt as every earlier version wrote them (the loop, the finite checks, the methods'
# states, the RNGs and the metrics lines).
RESUME_KEYS = {"best_acc", "best_state", "elle", "first_bad_iter", "free_delta", "iteration", "layouts",
               "metrics_lines",
               "model", "next_epoch", "opt", "rng", "scaler", "skipped_in_a_row", "skipped_steps", "stalled_at",
               "train_seconds"}


@pytest.mark.parametrize("method", [["--minibatch_replay", "2", "--fgsm_alpha", "1"],
                                    ["--elle_lambda", "4000", "--elle_adaptive", "--attack_init", "zero"]])
def test_a_resume_pt_in_the_earlier_format_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method):
    args = TINY + ["--epochs", "2", "--attack", "fgsm", *method]
    assert train.main(args + ["--out_dir", str(tmp_path / "full")]) == 0
    stop_after_epoch(monkeypatch, 1)
    with pytest.raises(Interrupt):
        train.main(args + ["--out_dir", str(tmp_path / "cut")])
    monkeypatch.undo()
    name = rundir.run_name(*config.parse_config(args))
    path = tmp_path / "cut" / name / train.RESUME_FILE
    saved = torch.load(path, weights_only=False)
    assert set(saved) == RESUME_KEYS | {"run_name", "settings_hash"}  # the keys that tie it to its run
    torch.save({k: saved[k] for k in RESUME_KEYS}, path)  # exactly the earlier format, nothing else
    assert train.main(args + ["--out_dir", str(tmp_path / "cut")]) == 0

    def numbers(root):
        final = json.loads((root / name / "final.json").read_text())
        rows = read_metrics(str(root / name))
        untimed = {"train_minutes", "elapsed_s"}
        return ({k: v for k, v in final.items() if k not in untimed},
                [{k: v for k, v in r.items() if k not in untimed} for r in rows])
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "full")


def test_nan_loss_stops_with_exit_4_and_keeps_the_last_good_state(tmp_path, cli, monkeypatch):
    injected(monkeypatch, nan_at=6)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 4
    assert "iteration 6" in proc.err and len(proc.err_lines) == 1
    run_dir = run_dir_of(tmp_path, RUN)
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    state = torch.load(os.path.join(run_dir, train.RESUME_FILE), weights_only=False)
    assert state["next_epoch"] == 2 and state["iteration"] == 5  # after epoch 1 (iterations 1-4); epoch 2 saw it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_absurd_learning_rate_is_caught_as_nonfinite(tmp_path, cli):
    proc = cli("train.py", *RUN, "--out_dir", tmp_path, "--lr_max", "1e38")
    assert proc.code == 4, proc.err
    assert "NaN or inf" in proc.err


# ---------------------------------------------------------------------------------- BatchNorm stats
@pytest.mark.parametrize("flags, forwards", [
    (["--attack", "fgsm"], 2),
    (["--attack", "fgsm", "--grad_align_cos_lambda", "0.2"], 3),
    (["--attack", "pgd", "--pgd_train_n_iters", "2"], 2 + 2),
    (["--attack", "none"], 2),
    (["--attack", "fgsm", "--minibatch_replay", "2"], 2),
])
def test_batchnorm_running_stats_are_updated_by_exactly_the_reference_forwards(tmp_path, flags, forwards):
    write_cifar10(tmp_path / "data", [[1, 2], [3, 4], [], [], []], [5, 6])  # 4 images: batch 2 -> 2 iterations/epoch
    # the small BatchNorm network: the count is the trainer's, whatever network it trains
    args = ["--dataset", "cifar10", "--model", "cnn_bn", "--n_layers", "2", "--n_filters_cnn", "4",
            "--data_dir", str(tmp_path / "data"), "--epochs", "1",
            "--batch_size", "2", "--n_eval_every_k_iter", "2", "--batch_size_eval", "2", "--attack_iters", "1",
            "--n_final_eval", "2", "--device", "cpu", "--debug", "--out_dir", str(tmp_path / "runs"), *flags]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    ckpt = torch.load(os.path.join(tmp_path / "runs", train.run_name(cfg, defaults), "model.pth"),
                      weights_only=True)
    n_iterations = 2 + 1  # one epoch of 2 iterations, plus epoch 0
    counts = {k: int(v) for k, v in ckpt["last"].items() if k.endswith("num_batches_tracked")}
    assert counts == {"_model.1.num_batches_tracked": n_iterations * forwards,
                      "_model.4.num_batches_tracked": n_iterations * forwards}


# ------------------------------------------------------------------------------------------ epoch 0
def test_epoch_zero_changes_no_parameter(tmp_path):
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--grad_align_cos_lambda", "1", "--epochs", "0")
    torch.manual_seed(0)
    fresh = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    last = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)["last"]
    for key, value in fresh.items():
        assert torch.equal(last[key], value), key
    assert [r["iteration"] for r in read_metrics(run_dir)] == [0]


# ------------------------------------------------------------------------------------------- Free-AT
def _config(*extra: str) -> train.Config:
    return train.parse_config(TINY + list(extra))[0]


def _tiny_batch():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    x = torch.rand(6, 1, 8, 8)
    x[:, :, 0, :] = 0.0  # exact box boundaries
    x[:, :, -1, :] = 1.0
    return model, x, torch.randint(0, 10, (6,))


def test_free_at_first_delta_is_the_fgsm_step_from_zero_and_weights_see_the_updated_delta():
    model, x, y = _tiny_batch()
    cfg = _config("--attack", "fgsm", "--minibatch_replay", "4", "--fgsm_alpha", "1.0", "--attack_init", "random",
               "--weight_decay", "0")
    eps = cfg.eps_frac
    x_req = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(utils.box_clamp(x + x_req, "half")), y)
    (g,) = torch.autograd.grad(loss, x_req)
    expected_delta = torch.clamp(x + eps * torch.sign(g), 0, 1) - x

    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    st = train.StepState()
    train.train_step(model, opt, scaler, x, y, cfg, st, train.Stats(torch.device("cpu")), update=True)
    assert torch.allclose(st.states["free_delta"], expected_delta, atol=1e-7)  # zero start, although init=random

    hand = F.cross_entropy(reference(x + expected_delta), y)
    hand.backward()
    for p_hand, p in zip(reference.parameters(), model.parameters()):
        assert torch.allclose(p.grad, p_hand.grad, atol=1e-6)


def test_free_at_draws_a_new_batch_every_m_iterations(tmp_path, monkeypatch):
    seen = []
    original = train.train_step

    def spy(model, opt, scaler, x, y, cfg, st, stats, update):
        seen.append(hash(x.numpy().tobytes()))
        return original(model, opt, scaler, x, y, cfg, st, stats, update)
    monkeypatch.setattr(train, "train_step", spy)
    # batch 200 -> 7 iterations per epoch; m = 3 -> batches at i = 0, 3, 6: ceil(7/3) = 3 distinct
    run_train(tmp_path, "--attack", "fgsm", "--minibatch_replay", "3", "--batch_size", "200",
              "--n_eval_every_k_iter", "200", "--eval_iter_freq", "100")
    epoch1 = seen[1:]
    assert len(epoch1) == 7
    assert len(set(epoch1)) == 3
    assert epoch1[0] == epoch1[1] == epoch1[2] and epoch1[3] == epoch1[4] == epoch1[5] != epoch1[6]


# ------------------------------------------------------------------------------------- SVHN warm-up
def test_svhn_warmup_factor():
    cfg = train.parse_config(["--dataset", "svhn"])[0]
    assert [train.warmup_factor(cfg, i) for i in (0, 1, 2861, 5000)] == [0.0, 1 / 2861, 1.0, 1.0]
    assert train.warmup_factor(train.parse_config([])[0], 0) == 1.0  # cifar10: none


def test_svhn_warmup_scales_the_fgsm_step_only():
    model, x, y = _tiny_batch()
    cfg = _config("--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1.0")
    half = methods.perturb_fgsm(model, x, y, cfg, train.StepState(warm=0.5)).delta
    full = methods.perturb_fgsm(model, x, y, cfg, train.StepState(warm=1.0)).delta
    unclipped = full.abs() > cfg.eps_frac - 1e-6  # the box did not cut the full step there
    assert unclipped.sum() > 10
    assert torch.allclose(half[unclipped], 0.5 * full[unclipped], atol=1e-6)


# ------------------------------------------------------------------------------- GradAlign with PGD
def test_gradalign_with_pgd_backpropagates_through_grad1():
    model, x, y = _tiny_batch()
    cfg = _config("--attack", "pgd", "--attack_init", "zero", "--grad_align_cos_lambda", "1", "--weight_decay", "0",
               "--pgd_train_n_iters", "1")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")),
                     update=True)
    step_grads = [p.grad.clone() for p in model.parameters()]

    def param_grads(detach_grad1: bool):
        torch.manual_seed(1)
        delta = utils.pgd_attack(model, x, y, cfg.eps_frac, cfg.pgd_alpha_train_frac, 1, random_start=False,
                                 clamp_rule="half")
        grad1, _ = utils.input_grad(model, x, y, torch.zeros_like(x), create_graph=not detach_grad1)
        loss = F.cross_entropy(model(x + delta), y)
        grad2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, cfg.eps_frac), create_graph=True)
        total = loss + utils.grad_align_reg(grad1.detach() if detach_grad1 else grad1, grad2, 1.0)
        return torch.autograd.grad(total, list(model.parameters()))
    with_graph, detached = param_grads(False), param_grads(True)
    for g_step, g_graph in zip(step_grads, with_graph):
        assert torch.allclose(g_step, g_graph, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(with_graph, detached))


# --------------------------------------------------------------------------- evaluation and 'best'
def test_periodic_evaluation_fires_after_the_step_on_the_global_counter(tmp_path):
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2", "--eval_iter_freq", "3")
    rows = read_metrics(run_dir)
    assert [(r["epoch"], r["iteration"]) for r in rows] == [(0, 0), (1, 3), (2, 6)]
    assert rows[0]["lr"] == 0.0  # epoch 0: t <= 0, and no optimiser step


def test_best_is_the_untrained_model_when_training_pgd_accuracy_stays_zero(tmp_path, monkeypatch):
    original = utils.periodic_metrics

    def zero_train_pgd(*args, **kwargs):
        return {**original(*args, **kwargs), "train_pgd_acc": 0.0}
    monkeypatch.setattr(utils, "periodic_metrics", zero_train_pgd)
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2")
    torch.manual_seed(0)
    fresh = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    ckpt = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)
    assert all(torch.equal(ckpt["best"][k], v) for k, v in fresh.items())
    assert not all(torch.equal(ckpt["last"][k], v) for k, v in fresh.items())


def test_best_is_replaced_only_on_strictly_higher_accuracy(tmp_path, monkeypatch):
    scores = iter([0.5, 0.5, 0.25, 0.75, 0.75])  # evaluations at iterations 0, 2, 4, 6, 8
    snapshots = []
    original = train.periodic_evaluation

    def scripted(model, fwd_model, loaders, cfg):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {**original(model, fwd_model, loaders, cfg), "train_pgd_acc": next(scores)}
    monkeypatch.setattr(train, "periodic_evaluation", scripted)
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2")
    best = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)["best"]
    assert len(snapshots) == 5
    assert all(torch.equal(best[k], v) for k, v in snapshots[3].items())  # first 0.75, not the tie after it
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert final["best_train_pgd_acc"] == 0.75


METHODS = {
    "fgsm": ["--attack", "fgsm", "--attack_init", "zero"],
    "fgsm_rs": ["--attack", "fgsm", "--attack_init", "random"],
    "free_at": ["--attack", "fgsm", "--minibatch_replay", "3", "--fgsm_alpha", "1.0"],
    "pgd": ["--attack", "pgd", "--attack_init", "zero", "--pgd_train_n_iters", "2", "--pgd_alpha_train", "38"],
    "pgd_corner": ["--attack", "pgd_corner", "--pgd_train_n_iters", "2", "--pgd_alpha_train", "38"],
    "random_corner": ["--attack", "random_corner"],
    "none": ["--attack", "none"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("lam", ["0", "1"])
def test_every_method_writes_the_run_files(tiny_run, method, lam):
    extra = METHODS[method] + ["--grad_align_cos_lambda", lam]
    if method in ("fgsm", "pgd"):
        extra.append("--half_prec")  # the bf16 autocast path, double backprop included
    run_dir = tiny_run(*extra).run_dir
    for name in ("config.json", "metrics.jsonl", "model.pth", "final.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert not os.path.exists(os.path.join(run_dir, "log.txt"))  # --debug: no log file, as in the authors' code
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1
    assert (final["n_eval"], final["attack_iters"], final["n_restarts"], final["eps"]) == (64, 10, 3, 76)
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 2, 4]
    keys = {"epoch", "iteration", "lr", "train_loss", "train_reg", "train_acc", "test_clean_acc", "test_fgsm_acc",
            "test_pgd_acc", "train_pgd_acc", "cos_x_eta", "cos_fgsm_pgd", "grad_norm_x", "delta_l2",
            "elapsed_s", "filter_norms"}
    assert keys <= set(rows[-1])
    for row in rows:
        assert not any(math.isnan(v) for v in row.values() if isinstance(v, float)), row
    no_input_grad = lam == "0" and METHODS[method][1] not in ("fgsm",)  # forward-only monitoring pass
    assert all((r["grad_norm_x"] is None) == no_input_grad for r in rows[1:])
    if lam == "0":
        assert all(r["train_reg"] == 0 for r in rows)
    else:
        assert any(r["train_reg"] > 0 for r in rows[1:])
    ckpt = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)
    assert set(ckpt) == {"last", "best"}
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["clamp_grad"] == "half" and config["torch_version"] == torch.__version__


def test_second_launch_skips_and_overwrite_retrains(tmp_path, capsys):
    run_dir = run_train(tmp_path, "--attack", "none")
    final_path = os.path.join(run_dir, "final.json")
    before = os.path.getmtime(final_path), open(final_path).read()
    capsys.readouterr()
    assert train.main(TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "none"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (os.path.getmtime(final_path), open(final_path).read()) == before
    assert train.main(TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "none", "--overwrite"]) == 0
    assert os.path.getmtime(final_path) >= before[0]


def test_same_seed_same_numbers(tmp_path):
    def numbers(sub):
        run_dir = run_train(tmp_path / sub, "--attack", "fgsm", "--grad_align_cos_lambda", "0.5", "--epochs", "2")
        rows = read_metrics(run_dir)
        for r in rows:
            r.pop("elapsed_s"), r.pop("train_minutes")
        final = json.load(open(os.path.join(run_dir, "final.json")))
        final.pop("train_minutes")
        return rows, final
    assert numbers("a") == numbers("b")


def test_an_overflowing_fp16_pass_is_counted_once_and_the_count_resets():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    fwd = precision.Autocast(model, "cpu", torch.float16, scaler=huge)
    utils.input_grad(fwd, x, y, torch.zeros_like(x))
    assert precision.take_fp32_redos(fwd) == 1 and precision.take_fp32_redos(fwd) == 0
    utils.input_grad(precision.Autocast(model, "cpu", torch.float16), x, y, torch.zeros_like(x))
    assert precision.take_fp32_redos(model) == 0  # not a wrapper: nothing to count


def test_metrics_count_the_fp16_passes_redone_in_fp32_since_the_last_record(tmp_path, monkeypatch):
    """Every scaled pass overflows (a scale of 1e30): each record must count exactly the scaled passes
    (training and periodic evaluation) made since the previous record."""
    monkeypatch.setattr(precision.Autocast, "input_grad_scale", lambda self, b, device: torch.tensor(1e30))
    scaled, at_record = [0], []
    summed = utils._summed_ce_grad

    def spy(model, x, y, delta, clamp_rule, create_graph, scale):
        scaled[0] += scale is not None
        return summed(model, x, y, delta, clamp_rule, create_graph, scale)
    append = rundir.append_jsonl

    def record(path, row):
        at_record.append(scaled[0])
        append(path, row)
    monkeypatch.setattr(utils, "_summed_ce_grad", spy)
    monkeypatch.setattr(rundir, "append_jsonl", record)
    args = TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm", "--half_prec", "--half_prec_dtype", "float16"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    rows = rundir.read_jsonl(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "metrics.jsonl"))
    counts = [r["fp32_redone_passes"] for r in rows]
    assert counts == [b - a for a, b in zip([0] + at_record, at_record)] and min(counts) > 0


def test_fp32_runs_record_no_redo(tmp_path):
    args = TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    rows = rundir.read_jsonl(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "metrics.jsonl"))
    assert [r["fp32_redone_passes"] for r in rows] == [0] * len(rows)
    assert json.loads(open(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "config.json")).read())[
        "half_prec_dtype_used"] is None


# ------------------------------------------------------------------------------ what a run will cost
def test_a_run_says_at_start_what_it_will_cost_and_projects_the_time_left(tmp_path, cli):
    proc = cli("train.py", *TINY, "--epochs", "2", "--eval_early_stopped_model", "--out_dir", tmp_path)
    assert proc.code == 0
    lines = proc.out_lines
    # digits: 1400 training points in batches of 350 = 4 steps per epoch; evaluated every 2 steps
    cost = ("cost: 9 training steps (epoch 0's one, then 2 epochs) of 2 forward+backward passes (FGSM-RS), "
            "5 periodic evaluations, then PGD-10-3 of the last and best weights on 64 test points; the time left "
            "is projected after the first epoch")
    assert cost in lines and lines.index(cost) == 1  # right after 'run ... on cpu'
    (projected,) = [line for line in lines if line.startswith("epoch 1 took ")]
    assert projected.endswith(" for the 1 epoch(s) left, then the final evaluation (projected from this epoch)")
    assert train.duration(4.23) == "4.2 s" and train.duration(200) == "3.3 min" and train.duration(3 * 86400) == \
        "3.0 days"
