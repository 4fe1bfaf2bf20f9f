"""The successor methods' pure functions in utils.py: N-FGSM, ZeroGrad, ELLE / ELLE-A and the
finite-difference GradAlign gradient (tiny models, CPU, well under a second each)."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import utils


def _relu_net(d: int = 12, n_classes: int = 3, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, n_classes)).to(dtype)


def _smooth_net(d: int = 12, n_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, n_classes)).double()


# ------------------------------------------------------------------------------------------------ N-FGSM
@pytest.mark.parametrize("k", [1.0, 2.0])
def test_nfgsm_noise_range_is_k_eps_and_in_the_box(k):
    torch.manual_seed(0)
    eps = 0.05
    x = torch.full((64, 1, 8, 8), 0.5)  # far from the box: the noise is not clipped
    noise = utils.nfgsm_noise(x, eps, k)
    assert noise.abs().max() <= k * eps + 1e-7
    assert noise.abs().max() > 0.98 * k * eps  # fills the whole range, not just the eps-ball
    assert noise.min() < -0.9 * k * eps and noise.max() > 0.9 * k * eps
    edge = torch.cat([torch.zeros(32, 1, 8, 8), torch.ones(32, 1, 8, 8)])
    z = edge + utils.nfgsm_noise(edge, eps, k)
    assert z.min() >= 0 and z.max() <= 1


def test_nfgsm_step_is_alpha_eps_sign_grad_and_leaves_the_ball():
    torch.manual_seed(1)
    model = _relu_net(d=16, n_classes=4)
    x = 0.2 + 0.6 * torch.rand(32, 1, 4, 4)  # >= 3 eps from the box: nothing is box-clipped
    y = torch.randint(0, 4, (32,))
    eps, k, alpha = 0.05, 2.0, 1.0
    delta, grad, eta = utils.nfgsm_attack(model, x, y, eps, k, alpha * eps)
    assert not delta.requires_grad and not grad.requires_grad
    # the gradient is the one at the start point x + eta
    expected_grad, _ = utils.input_grad(model, x, y, eta)
    assert torch.allclose(grad, expected_grad)
    assert (grad != 0).float().mean() > 0.9
    assert torch.allclose(delta, eta + alpha * eps * torch.sign(grad), atol=1e-6)
    # not projected: many coordinates end outside the eps-ball, none beyond (k + alpha) eps
    assert (delta.abs() > eps + 1e-6).float().mean() > 0.2
    assert delta.abs().max() <= (k + alpha) * eps + 1e-6
    # near the box the result is box-clamped, and only that
    xb = torch.cat([torch.zeros(16, 1, 4, 4), torch.ones(16, 1, 4, 4)])
    delta_b, _, _ = utils.nfgsm_attack(model, xb, y, eps, k, alpha * eps)
    assert (xb + delta_b).min() >= 0 and (xb + delta_b).max() <= 1


# ---------------------------------------------------------------------------------------------- ZeroGrad
# (the quantile filter itself: tests/test_training.py)
def test_zerograd_attack_moves_only_the_kept_coordinates():
    torch.manual_seed(3)
    model = _relu_net(d=16, n_classes=4)
    x = 0.3 + 0.4 * torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    eps, q = 0.05, 0.5
    delta0 = torch.zeros_like(x)
    delta, grad, start = utils.zerograd_attack(model, x, y, delta0, eps, eps, q)
    assert torch.equal(start, delta0)  # inside the box: the projection leaves the start alone
    kept = utils.zero_smallest(grad, q)
    assert torch.allclose(delta, eps * torch.sign(kept))
    assert int((delta == 0).sum()) >= int(q * 16) * 8
    plain, _ = utils.fgsm_attack(model, x, y, delta0, eps, eps, "zero")
    assert not torch.equal(delta, plain)  # the filter changed the step
    assert delta.abs().max() <= eps + 1e-7


# -------------------------------------------------------------------------------------------------- ELLE
def test_elle_error_is_zero_for_an_affine_loss_and_positive_for_a_relu_net():
    torch.manual_seed(4)
    x = torch.rand(64, 1, 4, 4)
    y = torch.randint(0, 3, (64,))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    # a loss that is affine in the input: the logit of the true class (the combination of the three
    # losses must use the same weight a on x_a as in x_c, else this is not 0)
    def true_logit(logits, yy):
        return logits.gather(1, yy[:, None]).squeeze(1)
    err = utils.elle_error(linear, x.double(), y, 0.3, loss_fn=true_logit)
    assert err.item() < 1e-24
    relu = _relu_net(d=16, seed=4).double()
    with torch.no_grad():
        relu[1].weight.mul_(5)
    assert utils.elle_error(relu, x.double(), y, 0.3, loss_fn=true_logit).item() > 1e-6
    assert utils.elle_error(relu, x.double(), y, 0.3).item() > 1e-6  # cross-entropy, curved


def test_elle_points_stay_in_the_ball_and_the_box():
    torch.manual_seed(5)
    seen = []

    class Spy(nn.Module):
        def forward(self, z):
            seen.append(z.detach().clone())
            return z.flatten(1)[:, :3]
    x = torch.cat([torch.zeros(8, 1, 2, 2), torch.ones(8, 1, 2, 2), torch.rand(8, 1, 2, 2)])
    y = torch.randint(0, 3, (24,))
    eps = 0.2
    utils.elle_error(Spy(), x, y, eps)
    (z,) = seen
    assert z.shape[0] == 3 * len(x)  # one forward of the three points
    for part in z.split(len(x)):
        assert (part - x).abs().max() <= eps + 1e-6
        assert part.min() >= 0 and part.max() <= 1


class _GradModeProbe(torch.autograd.Function):
    """Identity whose backward records whether it ran with grad mode on (that is, under create_graph:
    a double backprop)."""
    calls: ClassVar[list[bool]] = []

    @staticmethod
    def forward(ctx, z):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        _GradModeProbe.calls.append(torch.is_grad_enabled())
        return g


class _Probed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z):
        return self.inner(_GradModeProbe.apply(z))


def test_elle_needs_no_double_backprop():
    model = _Probed(_relu_net(d=16))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    _GradModeProbe.calls = []
    err = utils.elle_error(model, x, y, 0.1)
    err.backward()
    assert _GradModeProbe.calls == []  # the points need no input gradient at all
    model.zero_grad()
    # control: GradAlign's exact regulariser does backprop through a backward pass
    g1, _ = utils.input_grad(model, x, y, torch.zeros_like(x))
    g2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, 0.1), create_graph=True)
    utils.grad_align_reg(g1, g2, 1.0).backward()
    assert True in _GradModeProbe.calls


def test_elle_adaptive_lambda_decays_then_jumps_on_a_spike():
    rule = utils.ElleAdaptive(lam_max=4000.0)
    steady = [1.0 + 0.02 * (i % 2) for i in range(50)]  # never more than 1 std above the mean
    lams = [float(rule.update(torch.tensor(v))) for v in steady]
    assert max(lams) == 0.0  # starts at 0; steady errors never trigger
    lam = float(rule.update(torch.tensor(2.0)))  # an injected spike, far above mean + 2 std
    assert lam == 0.0  # it sets the next step's lambda
    after = [float(rule.update(torch.tensor(1.0))) for _ in range(4)]
    assert after == pytest.approx([4000, 4000 * 0.99, 4000 * 0.99 ** 2, 4000 * 0.99 ** 3])
    # the running statistics are those of every error seen, population std
    assert rule.count == 55
    # restoring the state continues the same sequence
    clone = utils.ElleAdaptive(lam_max=4000.0)
    clone.load_state_dict(rule.state_dict())
    assert float(clone.update(torch.tensor(1.0))) == float(rule.update(torch.tensor(1.0)))


def test_elle_adaptive_needs_three_errors_before_a_spike():
    rule = utils.ElleAdaptive(lam_max=10.0)
    assert [float(rule.update(torch.tensor(v))) for v in (1.0, 1.0, 1.0, 5.0)] == [0.0, 0.0, 0.0, 0.0]
    assert float(rule.update(torch.tensor(1.0))) == 10.0


# ------------------------------------------------------------------------------ GradAlign, finite difference
def _exact_and_fd_param_grads(model, x, y, eta, h, with_grad1):
    params = list(model.parameters())
    g1_graph, _ = utils.input_grad(model, x, y, torch.zeros_like(x), create_graph=with_grad1)
    g2_graph, _ = utils.input_grad(model, x, y, eta, create_graph=True)
    exact = torch.autograd.grad(utils.grad_align_reg(g1_graph, g2_graph, 1.0), params)
    g1, g2 = g1_graph.detach(), g2_graph.detach()
    reg = utils.grad_align_reg_fd(model, x, y, g1, g2, eta, 1.0, h,
                                  delta1=torch.zeros_like(x) if with_grad1 else None)
    assert reg.item() == pytest.approx(utils.grad_align_reg(g1, g2, 1.0).item(), rel=1e-9)
    fd = torch.autograd.grad(reg, params)
    return torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in fd])


@pytest.mark.parametrize("with_grad1", [False, True])
def test_grad_align_fd_gradient_approaches_the_exact_one(with_grad1):
    model = _smooth_net(d=12, n_classes=3, seed=7)
    torch.manual_seed(7)
    x = torch.rand(16, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    eta = utils.uniform_delta(x, 0.3)
    errors = []
    for h in (0.3, 0.03, 0.003):
        exact, fd = _exact_and_fd_param_grads(model, x, y, eta, h, with_grad1)
        errors.append(float((fd - exact).norm() / exact.norm()))
        cos = float(F.cosine_similarity(fd, exact, dim=0))
    assert cos > 0.999
    assert errors[0] > errors[1] > errors[2]  # converges as h shrinks
    assert errors[2] < 1e-3


def test_grad_align_fd_on_a_relu_cnn():
    # A ReLU network's double backprop treats the kinks as flat; the finite difference sees a kink
    # whenever one lies within h of a point. So the two agree once h is below the distance to every
    # kink (float64 here, h 1e-5), and the surrogate never backprops through a backward pass.
    torch.manual_seed(8)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4).double()
    x, y = torch.rand(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    eta = utils.uniform_delta(x, 0.2)
    exact, fd = _exact_and_fd_param_grads(model, x, y, eta, 1e-5, False)
    assert float(F.cosine_similarity(fd, exact, dim=0)) > 0.99
    probed = _Probed(model)
    _GradModeProbe.calls = []
    g1, _ = utils.input_grad(probed, x, y, torch.zeros_like(x))
    g2, _ = utils.input_grad(probed, x, y, eta)
    utils.grad_align_reg_fd(probed, x, y, g1, g2, eta, 1.0, 1e-5).backward()
    assert _GradModeProbe.calls and True not in _GradModeProbe.calls
