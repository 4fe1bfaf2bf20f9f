"""GradAlign's regulariser utils.grad_align_reg (arXiv 2007.02617)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models
import utils


def _reference_reg(g1: torch.Tensor, g2: torch.Tensor, lam: float) -> float:
    """lam * (1 - mean cos), written independently: flatten, normalise each row, dot, average."""
    a, b = g1.reshape(len(g1), -1).double(), g2.reshape(len(g2), -1).double()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return lam * (1.0 - float((a * b).sum(1).mean()))


def test_lambda_zero_gives_exactly_zero():
    torch.manual_seed(0)
    g1, g2 = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    reg = utils.grad_align_reg(g1, g2, 0.0)
    assert isinstance(reg, torch.Tensor) and reg.dim() == 0
    assert reg.item() == 0.0


@pytest.mark.parametrize("lam", [0.2, 1.0, 2.0])
def test_matches_independent_formula(lam):
    torch.manual_seed(1)
    g1 = torch.randn(16, 3, 4, 4)
    g2 = 0.5 * g1 + torch.randn(16, 3, 4, 4)  # correlated: cosines well away from 0
    reg = utils.grad_align_reg(g1, g2, lam)
    expected = _reference_reg(g1, g2, lam)
    assert reg.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0.05 * lam < reg.item() < 1.5 * lam
    # identical gradients: cos 1, reg 0; opposite: cos -1, reg 2*lam; scale does not matter
    assert utils.grad_align_reg(g1, 3.0 * g1, lam).item() == pytest.approx(0.0, abs=1e-6)
    assert utils.grad_align_reg(g1, -g1, lam).item() == pytest.approx(2 * lam, rel=1e-6)


def test_zero_gradients_are_excluded_from_the_mean():
    torch.manual_seed(2)
    g1, g2 = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    g1[1] = 0
    g2[4] = 0
    g1[5] = 0
    g2[5] = 0
    keep = [0, 2, 3]
    reg = utils.grad_align_reg(g1, g2, 1.0)
    expected = _reference_reg(g1[keep], g2[keep], 1.0)
    assert torch.isfinite(reg)
    assert reg.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # counting the dropped examples as cos 0 or cos 1 would give a different number
    with_zeros = 1.0 - (1.0 - expected) * 3 / 6
    assert abs(reg.item() - with_zeros) > 1e-3


def test_all_examples_excluded_gives_nan():
    torch.manual_seed(3)
    g1, g2 = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    g1[:2] = 0
    g2[2:] = 0
    assert math.isnan(utils.grad_align_reg(g1, g2, 0.5).item())
    assert math.isnan(utils.grad_align_reg(torch.zeros(3, 4), torch.zeros(3, 4), 1.0).item())


def test_linear_two_class_model_has_perfect_alignment():
    # For f(x) = W x + b with two classes, d CE / dx = (p_1 - y_1) (W[1] - W[0]), where
    # p_1 = softmax(f(x))_1 is in (0, 1) and y_1 is 0 or 1. So p_1 - y_1 is > 0 for label 0 and < 0 for
    # label 1 at EVERY x: the gradient at x and at x + eta is the same vector W[1] - W[0] times a scalar
    # of the same sign, their cosine is exactly 1 and GradAlign's reg is 0 (up to rounding). The
    # logits stay moderate (|logit diff| < ~10), so p_1 never rounds to exactly 0 or 1 in fp32.
    torch.manual_seed(4)
    d = 3 * 4 * 4
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    x = torch.rand(32, 3, 4, 4)
    y = torch.randint(0, 2, (32,))
    eps = 8 / 255
    eta = utils.uniform_delta(x, eps)
    g1, _ = utils.input_grad(model, x, y, torch.zeros_like(x))
    g2, _ = utils.input_grad(model, x, y, eta)
    direction = (model[1].weight[1] - model[1].weight[0]).detach()
    cos_dir = torch.nn.functional.cosine_similarity(g1.flatten(1), direction.expand(32, d), dim=1)
    assert torch.allclose(cos_dir.abs(), torch.ones(32), atol=1e-5)  # parallel to W[1] - W[0]
    assert torch.all(utils.per_example_cos(g1, g2) > 1 - 1e-5)
    reg = utils.grad_align_reg(g1, g2, 1.0)
    assert abs(reg.item()) < 1e-5
    # a model that is not linear in x (ReLU hidden layer) does not align perfectly: the test can fail
    torch.manual_seed(4)
    relu_model = nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 2))
    big_eta = utils.uniform_delta(x, 0.5)
    h1, _ = utils.input_grad(relu_model, x, y, torch.zeros_like(x))
    h2, _ = utils.input_grad(relu_model, x, y, big_eta)
    assert utils.grad_align_reg(h1, h2, 1.0).item() > 1e-3


def test_reg_backpropagates_to_parameters():
    torch.manual_seed(5)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    eps = 0.1
    grad1, _ = utils.input_grad(model, x, y, torch.zeros_like(x), clamp_rule="zero")
    assert not grad1.requires_grad
    grad2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, eps), create_graph=True)
    assert grad2.requires_grad
    reg = utils.grad_align_reg(grad1, grad2, 0.5)
    assert reg.dim() == 0 and reg.requires_grad and torch.isfinite(reg)
    model.zero_grad(set_to_none=True)
    reg.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_no_host_sync_and_scalar_tensor():
    # 0-dim tensor result; under the profiler no op that copies a value to the host is recorded
    # (.item(), bool(), float() and .tolist() on a tensor all go through aten::_local_scalar_dense).
    torch.manual_seed(6)
    g1, g2 = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    g1[0] = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        reg = utils.grad_align_reg(g1, g2, 0.3)
    names = {e.name for e in prof.events()}
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    assert any(n.startswith("aten::") for n in names)  # the profiler did record the ops
    assert isinstance(reg, torch.Tensor) and reg.shape == ()
    # control: the same check catches a host sync
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        float(reg)
    assert "aten::_local_scalar_dense" in {e.name for e in prof.events()}
