"""Attacks, the box clamp, robust accuracy, cosines, the periodic evaluation (utils.py), the learning rate (train.py).

The box-clamp gradient rule, the learning-rate schedules, the FGSM step, the periodic and the final
evaluation. CPU only, small CNNs on 8x8 digits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import models
import train
import utils
from tests.fixtures import trained_digits_cnn


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as (N, 1, 8, 8) floats in [0, 1] (values k/16: exact 0s and 1s included)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


@pytest.fixture(scope="module")
def trained(digits):
    """A one-layer CNN (8 filters) after 60 full-batch Adam steps on the first 1000 digits, in eval mode,
    and a held-out batch of 128 digits."""
    model, x, y = trained_digits_cnn()
    return model, x[1000:1128].clone(), y[1000:1128].clone()


def _mean_ce(model, x, y, delta):
    with torch.no_grad():
        return float(F.cross_entropy(model(x + delta), y))


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------------------- box clamp
@pytest.mark.parametrize("rule, at_bound", [("zero", 0.0), ("half", 0.5)])
def test_box_clamp_gradient_rule_and_values(rule, at_bound):
    torch.manual_seed(0)
    z = torch.tensor([-0.7, -1e-4, 0.0, 1e-4, 0.3, 0.9999, 1.0, 1.0001, 2.0], requires_grad=True)
    out = utils.box_clamp(z, rule)
    assert torch.equal(out.detach(), torch.clamp(z.detach(), 0.0, 1.0))
    (grad,) = torch.autograd.grad(out.sum(), z)
    expected = torch.tensor([0.0, 0.0, at_bound, 1.0, 1.0, 1.0, at_bound, 0.0, 0.0])
    assert torch.equal(grad, expected)

    # Same on a random tensor: values as torch.clamp, gradient 1 strictly inside, 0 strictly outside.
    r = (torch.rand(1000) * 3 - 1).requires_grad_(True)
    out = utils.box_clamp(r, rule)
    assert torch.equal(out.detach(), torch.clamp(r.detach(), 0.0, 1.0))
    (g,) = torch.autograd.grad(out.sum(), r)
    inside = (r > 0) & (r < 1)
    assert torch.all(g[inside] == 1) and torch.all(g[~inside] == 0)


def test_box_clamp_rejects_unknown_rule():
    with pytest.raises(ValueError):
        utils.box_clamp(torch.zeros(3), "full")


# --------------------------------------------------------------------------- FGSM and the clamp rule
def _independent_sign_grad(model, x, y, rule):
    """sign of the gradient of the summed CE at clamp(x) wrt the input, with the clamp's gradient rule
    applied by hand: x is already in [0, 1], so the forward is model(x); the clamp multiplies the
    gradient by 1 inside (0, 1) and by 0 ('zero') or 0.5 ('half') at exactly 0 or 1."""
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    at_bound = (x == 0) | (x == 1)
    factor = torch.where(at_bound, torch.tensor(0.0 if rule == "zero" else 0.5), torch.tensor(1.0))
    return torch.sign(g * factor), torch.sign(g)


def test_fgsm_clamp_rule_on_boundary_pixels(trained):
    torch.manual_seed(0)
    model, x, y = trained
    eps = 0.2
    assert (x == 0).sum() > 100 and (x == 1).sum() > 20  # the batch has many boundary pixels
    zero = torch.zeros_like(x)
    d_zero, g_zero = utils.fgsm_attack(model, x, y, zero, eps, eps, "zero")
    d_half, g_half = utils.fgsm_attack(model, x, y, zero, eps, eps, "half")
    _, raw_sign = _independent_sign_grad(model, x, y, "half")

    at0, at1 = x == 0, x == 1
    boundary, interior = at0 | at1, ~(at0 | at1)
    # 'zero': no boundary pixel moves (its gradient is exactly 0).
    assert torch.all(g_zero[boundary] == 0)
    assert torch.all(d_zero[boundary] == 0)
    # 'half': a boundary pixel whose gradient points into the box moves by exactly eps ...
    into0, into1 = at0 & (raw_sign > 0), at1 & (raw_sign < 0)
    assert into0.sum() > 10 and into1.sum() > 5
    assert torch.allclose(d_half[into0], torch.full_like(d_half[into0], eps), atol=1e-6, rtol=0)
    assert torch.allclose(d_half[into1], torch.full_like(d_half[into1], -eps), atol=1e-6, rtol=0)
    # ... and one whose gradient points out of the box is projected back to 0.
    out0, out1 = at0 & (raw_sign < 0), at1 & (raw_sign > 0)
    assert torch.all(d_half[out0 | out1] == 0)
    # the 'half' gradient there is half the unclamped one, so it is nonzero
    assert torch.all(g_half[into0 | into1] != 0)
    # Interior pixels: identical gradients and deltas under both rules.
    assert torch.equal(g_zero[interior], g_half[interior])
    assert torch.equal(d_zero[interior], d_half[interior])
    assert (d_zero[interior] != 0).float().mean() > 0.5


@pytest.mark.parametrize("rule", ["zero", "half"])
def test_fgsm_zero_init_matches_independent_formula(trained, rule):
    torch.manual_seed(0)
    model, x, y = trained
    eps = 0.15
    delta, _ = utils.fgsm_attack(model, x, y, torch.zeros_like(x), eps, eps, rule)
    sign, _ = _independent_sign_grad(model, x, y, rule)
    expected = torch.clamp(x + eps * sign, 0.0, 1.0) - x
    assert torch.equal(delta, expected)


def test_fgsm_zero_init_large_step_is_eps_sign(trained):
    # With zero init and fgsm_alpha >= 1 the clipped step is eps * sign(g), as in the paper's FGSM.
    torch.manual_seed(0)
    model, x, y = trained
    eps = 0.1
    d1, _ = utils.fgsm_attack(model, x, y, torch.zeros_like(x), eps, eps, "half")
    d2, _ = utils.fgsm_attack(model, x, y, torch.zeros_like(x), eps, 1.25 * eps, "half")
    assert torch.equal(d1, d2)


# ----------------------------------------------------------------------------- feasibility invariants
def _assert_feasible(x, delta, eps):
    assert delta.shape == x.shape
    assert torch.isfinite(delta).all()
    assert delta.abs().max() <= eps + 1e-6
    assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3, 0.6])
def test_fgsm_deltas_are_feasible(trained, eps):
    torch.manual_seed(1)
    model, x, y = trained
    for rule in utils.CLAMP_RULES:
        for delta0 in (torch.zeros_like(x), utils.uniform_delta(x, eps)):
            delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, 1.25 * eps, rule)
            _assert_feasible(x, delta, eps)
            assert grad.shape == x.shape and not grad.requires_grad and not delta.requires_grad
    # the uniform start is not box-projected, yet the returned delta is
    start = utils.uniform_delta(x, eps)
    assert ((x + start) < 0).any() and start.abs().max() <= eps


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3, 0.6])
def test_pgd_deltas_are_feasible(trained, eps):
    torch.manual_seed(2)
    model, x, y = trained
    for rule in (None, "zero", "half"):
        for random_start in (True, False):
            delta = utils.pgd_attack(model, x, y, eps, eps / 4, 5, random_start=random_start, clamp_rule=rule)
            _assert_feasible(x, delta, eps)
    assert torch.equal(utils.pgd_attack(model, x, y, eps, eps / 4, 0, random_start=True), torch.zeros_like(x))


def test_attacks_leave_model_mode_alone(trained):
    torch.manual_seed(0)
    model, x, y = trained
    model.train()
    try:
        utils.pgd_attack(model, x[:8], y[:8], 0.1, 0.025, 2, random_start=True)
        utils.fgsm_attack(model, x[:8], y[:8], torch.zeros_like(x[:8]), 0.1, 0.1, "zero")
        assert model.training
    finally:
        model.eval()
    utils.pgd_attack(model, x[:8], y[:8], 0.1, 0.025, 2, random_start=True)
    assert not model.training


# ------------------------------------------------------------------------------------ attack strength
def test_loss_ordering_pgd_ge_fgsm_ge_clean(trained):
    # On a trained model the (linearised) FGSM step raises the loss, and 10 PGD steps of eps/4 from a
    # random start raise it further. The ordering is of mean losses over 128 points and holds with a
    # wide margin here (asserted below), so no tolerance is used.
    torch.manual_seed(3)
    model, x, y = trained
    for eps in (0.1, 0.2, 0.3):
        clean = _mean_ce(model, x, y, torch.zeros_like(x))
        d_fgsm = utils.pgd_attack(model, x, y, eps, eps, 1, random_start=False)
        d_pgd = utils.pgd_attack(model, x, y, eps, eps / 4, 10, random_start=True)
        fgsm, pgd = _mean_ce(model, x, y, d_fgsm), _mean_ce(model, x, y, d_pgd)
        assert clean < fgsm < pgd, (eps, clean, fgsm, pgd)
    assert fgsm > clean + 0.1


def test_robust_accuracy_ordering_and_clean(trained):
    # Single batch and the same seed: restart 1 of both runs starts from the same point, and the
    # iterates of the 5-step run are among those of the 20-step run, so with "robust only if correct at
    # every iterate of every restart" PGD-20x5 can never be above PGD-5x1.
    model, x, y = trained
    eps = 0.1
    clean_ref = _accuracy(model, x, y)
    torch.manual_seed(4)
    weak = utils.robust_accuracy(model, [(x, y)], eps, eps / 4, 5, 1)
    torch.manual_seed(4)
    strong = utils.robust_accuracy(model, [(x, y)], eps, eps / 4, 20, 5)
    assert weak.clean_acc == pytest.approx(clean_ref, abs=1e-12)
    assert strong.clean_acc == pytest.approx(clean_ref, abs=1e-12)
    assert 0 < strong.pgd_acc <= weak.pgd_acc <= weak.clean_acc
    assert weak.pgd_acc < weak.clean_acc  # the attack does something on this model
    assert weak.n_eval == strong.n_eval == len(y)
    assert clean_ref > 0.8  # the fixture is trained-ish


def _plain_pgd_robust(model, batches, eps, alpha, n_iters, n_restarts):
    """Plain full-batch PGD: per batch, per restart, one uniform draw for the whole batch, n_iters steps
    on every example; robust = correct clean and correct at every restart's final delta."""
    n_robust = n_clean = n_total = 0
    for x, y in batches:
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        n_clean += int(robust.sum())
        for _ in range(n_restarts):
            delta = torch.empty_like(x).uniform_(-eps, eps)
            for _ in range(n_iters):
                grad, _ = utils.input_grad(model, x, y, delta)
                delta = utils.project(x, delta + alpha * torch.sign(grad), eps)
            with torch.no_grad():
                robust &= model(x + delta).argmax(1) == y
        n_robust += int(robust.sum())
        n_total += len(y)
    return n_clean / n_total, n_robust / n_total


def test_robust_accuracy_never_weaker_than_plain_pgd(trained, digits):
    model, x_test, y_test = trained
    x_all, y_all = digits
    xw = x_all[1300:1340]
    with torch.no_grad():
        wrong = (model(xw).argmax(1) + 1) % 10  # a batch with no clean-correct example: nothing to attack
    batches = [(x_test[:64], y_test[:64]), (xw, wrong), (x_test[64:], y_test[64:]),
               (x_all[1200:1250], y_all[1200:1250])]
    n = sum(len(b[1]) for b in batches)
    eps, n_iters, n_restarts = 0.1, 8, 3
    torch.manual_seed(5)
    plain_clean, plain_robust = _plain_pgd_robust(model, batches, eps, eps / 4, n_iters, n_restarts)
    rng_plain = torch.get_rng_state()
    torch.manual_seed(5)
    res = utils.robust_accuracy(model, batches, eps, eps / 4, n_iters, n_restarts)
    # one uniform draw of the whole batch per batch and restart, even when nothing is left to attack,
    # so the random stream (and each example's start) is that of the plain full-batch PGD
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert res.n_eval == n
    assert res.clean_acc == pytest.approx(plain_clean, abs=1e-12)
    assert res.pgd_acc <= plain_robust + 1e-12
    assert plain_robust < plain_clean  # some examples get broken ...
    assert 0 < res.grad_passes < n * n_iters * n_restarts  # ... so early exit saves passes
    # every clean-correct example is attacked in restart 1 for at least one step
    assert res.grad_passes >= round(plain_clean * n)


class _BoxDetector(torch.nn.Module):
    """Two classes; predicts class 0 at every point of [0, 1]^d and class 1 at any point outside it."""

    def forward(self, x):
        outside = F.relu(-x).flatten(1).sum(1) + F.relu(x - 1).flatten(1).sum(1)
        return torch.stack([1.0 - 100.0 * outside, torch.zeros_like(outside)], dim=1)


@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_robust_accuracy_only_evaluates_feasible_points(digits, n_iters):
    # Every point robust_accuracy classifies must lie in the box (the module's invariant; the random
    # start is not box-projected before the first gradient, so it must never be classified as is).
    # On a model that is correct on all of [0, 1]^d, PGD accuracy must therefore equal clean accuracy.
    torch.manual_seed(9)
    x_all, _ = digits
    x = x_all[:64]
    assert (x == 0).any() and (x == 1).any()  # x + U[-eps, eps] leaves the box
    y = torch.zeros(64, dtype=torch.long)
    res = utils.robust_accuracy(_BoxDetector(), [(x, y)], 0.1, 0.025, n_iters, 2)
    assert res.clean_acc == 1.0
    assert res.pgd_acc == 1.0, f"n_iters={n_iters}: examples judged at points outside [0, 1]"


def test_robust_accuracy_progress_and_no_attack_when_all_wrong(trained):
    torch.manual_seed(6)
    model, x, y = trained
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10  # every label wrong
    seen = []
    res = utils.robust_accuracy(model, [(x[:50], wrong[:50]), (x[50:], wrong[50:])], 0.1, 0.025, 4, 2,
                                progress=seen.append)
    assert seen == [50, len(y) - 50]
    assert res.clean_acc == 0 and res.pgd_acc == 0 and res.grad_passes == 0


# ------------------------------------------------------------------------------------------ cosines
def test_per_example_cos():
    torch.manual_seed(7)
    a, b = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    a[1] = 0
    b[2] = 0
    a[3] = 0
    b[3] = 0
    b[4] = -2.5 * a[4]
    cos = utils.per_example_cos(a, b)
    assert cos.shape == (6,)
    expected = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    for i in (0, 5):
        assert cos[i].item() == pytest.approx(expected[i].item(), abs=1e-6)
        assert abs(cos[i].item()) < 0.99
    assert cos[1] == 1.0 and cos[2] == 1.0 and cos[3] == 1.0
    assert cos[4].item() == pytest.approx(-1.0, abs=1e-6)


# ----------------------------------------------------------------------------------- learning rates
def test_lr_cyclic():
    lr_max, epochs = 0.2, 30
    assert train.lr_at(12, "cyclic", lr_max, epochs) == pytest.approx(lr_max, abs=1e-12)
    assert train.lr_at(11.9, "cyclic", lr_max, epochs) < lr_max
    assert train.lr_at(12.1, "cyclic", lr_max, epochs) < lr_max
    for t in (-1.0, 0.0, 30.0, 31.0):
        assert train.lr_at(t, "cyclic", lr_max, epochs) == 0.0
    # linear up to 12, linear down to 30
    for t in np.linspace(0, 12, 13):
        assert train.lr_at(t, "cyclic", lr_max, epochs) == pytest.approx(lr_max * t / 12, abs=1e-12)
    for t in np.linspace(12, 30, 19):
        assert train.lr_at(t, "cyclic", lr_max, epochs) == pytest.approx(lr_max * (30 - t) / 18, abs=1e-12)
    first = train.lr_at(1 / 390, "cyclic", lr_max, epochs)
    assert first > 0 and first == pytest.approx(lr_max / 390 / 12, rel=1e-9)
    # peak at floor(2E/5)
    for e, peak in ((15, 6), (96, 38), (45, 18)):
        assert train.lr_at(peak, "cyclic", 1.0, e) == pytest.approx(1.0, abs=1e-12)
        assert train.lr_at(peak - 0.5, "cyclic", 1.0, e) < 1.0
        assert train.lr_at(peak + 0.5, "cyclic", 1.0, e) < 1.0


def test_lr_piecewise():
    lr_max, epochs = 0.1, 30
    assert train.lr_at(1 / 390, "piecewise", lr_max, epochs) == lr_max
    assert train.lr_at(14.99, "piecewise", lr_max, epochs) == lr_max
    assert train.lr_at(15, "piecewise", lr_max, epochs) == pytest.approx(lr_max / 10)
    assert train.lr_at(22.49, "piecewise", lr_max, epochs) == pytest.approx(lr_max / 10)
    assert train.lr_at(22.5, "piecewise", lr_max, epochs) == pytest.approx(lr_max / 100)
    assert train.lr_at(30, "piecewise", lr_max, epochs) == pytest.approx(lr_max / 100)
    with pytest.raises(ValueError):
        train.lr_at(1, "cosine", lr_max, epochs)


# ----------------------------------------------------------------------------- periodic evaluation
@pytest.mark.parametrize("training", [False, True])
def test_periodic_metrics(digits, training):
    torch.manual_seed(8)
    x, y = digits
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test_batches = [(x[:32], y[:32]), (x[32:64], y[32:64])]
    train_batches = [(x[100:132], y[100:132]), (x[132:164], y[132:164])]
    out = utils.periodic_metrics(model, test_batches, train_batches, 0.1, 0.025, 3, "half")
    assert set(out) == {"test_clean_acc", "test_fgsm_acc", "test_pgd_acc", "train_pgd_acc", "cos_x_eta",
                        "cos_fgsm_pgd"}
    for k in ("test_clean_acc", "test_fgsm_acc", "test_pgd_acc", "train_pgd_acc"):
        assert isinstance(out[k], float) and 0.0 <= out[k] <= 1.0
    for k in ("cos_x_eta", "cos_fgsm_pgd"):
        assert isinstance(out[k], float) and -1.0 - 1e-6 <= out[k] <= 1.0 + 1e-6
    assert out["test_clean_acc"] == pytest.approx(_accuracy(model, x[:64], y[:64]), abs=1e-12)
    assert out["test_pgd_acc"] <= out["test_clean_acc"] + 0.1  # a stronger attack than no attack
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training is training
