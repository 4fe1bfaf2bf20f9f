"""The later methods' gradient paths against restatements of their authors' released updates, on
inputs with saturated pixels; ELLE-A's one-step lag; the joint finite-difference GradAlign gradient
against double backprop with train-mode BatchNorm (CPU, tiny models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import train
import utils
from tests.fixtures import TINY

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


def test_grad_align_fd_is_refused_in_half_precision():
    assert utils.refuse_fd_in_half_precision(0.001, True).startswith("--grad_align_fd needs fp32")
    assert utils.refuse_fd_in_half_precision(0.001, False) is None
    assert utils.refuse_fd_in_half_precision(0.0, True) is None


# ------------------------------------------------------------------------------------- AutoAttack
def test_eval_autoattack_gets_the_fp32_model_under_half_prec(tmp_path, monkeypatch):
    pytest.importorskip("torchattacks")
    import autoattack_eval
    import eval as eval_py
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    path = str(tmp_path / "model.pth")
    torch.save({"last": model.state_dict(), "best": model.state_dict()}, path)
    phase, seen = ["pgd"], []
    build = models.build_model

    def spied(*args, **kwargs):  # the first conv's output dtype, per phase of eval.py
        net = build(*args, **kwargs)
        net._model[0].register_forward_hook(lambda m, i, out: seen.append((phase[0], out.dtype)))
        return net
    attack = autoattack_eval.attack_accuracy

    def marked(*args, **kwargs):
        phase[0] = "autoattack"
        return attack(*args, **kwargs)
    monkeypatch.setattr(models, "build_model", spied)
    monkeypatch.setattr(autoattack_eval, "attack_accuracy", marked)
    assert eval_py.main(["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76",
                         "--model_path", path, "--n_eval", "8", "--batch_size_eval", "8", "--device", "cpu",
                         "--attack_iters", "2", "--n_restarts", "1", "--half_prec", "--attack", "autoattack"]) == 0
    assert {dtype for p, dtype in seen if p == "pgd"} == {torch.bfloat16}  # PGD keeps --half_prec
    assert {dtype for p, dtype in seen if p == "autoattack"} == {torch.float32}


# ------------------------------------------------------------------------------ CIFAR-100, WRN-28-10
def _tiny_cifar100_run(tmp_path, model: str) -> str:
    import json
    import os

    from tests.fixtures import write_cifar100
    write_cifar100(tmp_path / "data", list(range(0, 100, 12)), [3, 50, 97, 12])  # 9 training, 4 test images
    out = tmp_path / "runs"
    args = ["--dataset", "cifar100", "--data_dir", str(tmp_path / "data"), "--model", model, "--epochs", "1",
            "--batch_size", "4", "--n_eval_every_k_iter", "4", "--eval_iter_freq", "2", "--attack_iters", "1",
            "--n_final_eval", "2", "--batch_size_eval", "2", "--device", "cpu", "--debug", "--out_dir", str(out),
            "--attack", "fgsm", "--attack_init", "zero"]
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


@pytest.mark.slow  # about a minute: 36.5M parameters on the CPU
def test_one_epoch_of_wrn28_10_on_tiny_cifar100_writes_a_run(tmp_path):
    run_dir = _tiny_cifar100_run(tmp_path, "wrn28_10")
    weights = torch.load(f"{run_dir}/model.pth", weights_only=True)["last"]
    assert weights["fc.weight"].shape == (100, 640) and len(weights) == 155
