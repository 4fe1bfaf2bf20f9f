"""Attacks, GradAlign and models: invariants that must hold whatever the data (CPU, seconds)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import models
import utils

EPS = 0.3


@pytest.fixture(scope="module")
def trained():
    """A CNN trained for a few Adam steps on digits, and a test batch with exact 0s and 1s."""
    from data import load_split
    torch.manual_seed(0)
    train, test = load_split("digits", "", True), load_split("digits", "", False)
    x, y = train.images.float() / 16, train.labels
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), test.images[:128].float() / 16, test.labels[:128]


# ---------------------------------------------------------------------------------- box clamp
def test_box_clamp_gradient_rules():
    z = torch.tensor([0.0, 0.5, 1.0, -0.2, 1.2], requires_grad=True)
    for rule, at_bounds in (("zero", 0.0), ("half", 0.5)):
        out = utils.box_clamp(z, rule)
        assert torch.equal(out, torch.clamp(z, 0, 1))
        (g,) = torch.autograd.grad(out.sum(), z)
        assert g.tolist() == [at_bounds, 1.0, at_bounds, 0.0, 0.0]


def test_zero_rule_never_moves_boundary_pixels_half_moves_those_pointing_inside(trained):
    model, x, y = trained
    assert (x == 0).any() and (x == 1).any()
    d_zero, _ = utils.fgsm_attack(model, x, y, torch.zeros_like(x), EPS, EPS, "zero")
    d_half, g_half = utils.fgsm_attack(model, x, y, torch.zeros_like(x), EPS, EPS, "half")
    boundary = (x == 0) | (x == 1)
    assert (d_zero[boundary] == 0).all()
    inward = ((x == 0) & (g_half > 0)) | ((x == 1) & (g_half < 0))
    assert inward.sum() > 100
    assert torch.allclose(d_half[inward].abs(), torch.full_like(d_half[inward], EPS))
    assert torch.equal(d_zero[~boundary], d_half[~boundary])


def test_fgsm_from_zero_is_eps_sign_grad_box_clamped(trained):
    model, x, y = trained
    delta, _ = utils.fgsm_attack(model, x, y, torch.zeros_like(x), EPS, EPS, "half")
    z = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(utils.box_clamp(z, "half")), y), z)
    assert torch.equal(delta, torch.clamp(x + EPS * torch.sign(g), 0, 1) - x)


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_every_attack_stays_in_the_ball_and_the_box(trained, eps):
    model, x, y = trained
    deltas = [utils.fgsm_attack(model, x, y, torch.zeros_like(x), eps, 1.25 * eps, "zero")[0],
              utils.fgsm_attack(model, x, y, utils.uniform_delta(x, eps), eps, 1.25 * eps, "half")[0]]
    for rule in (None, "zero", "half"):
        for random_start in (True, False):
            deltas.append(utils.pgd_attack(model, x, y, eps, eps / 4, 5, random_start=random_start,
                                           clamp_rule=rule))
    for delta in deltas:
        assert delta.abs().max() <= eps + 1e-6
        assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6


def test_loss_ordering_pgd_fgsm_clean(trained):
    model, x, y = trained
    torch.manual_seed(0)
    fgsm = utils.pgd_attack(model, x, y, EPS, EPS, 1, random_start=False)
    pgd = utils.pgd_attack(model, x, y, EPS, EPS / 4, 20, random_start=False)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x + d), y).item() for d in (torch.zeros_like(x), fgsm, pgd)]
    assert losses[0] <= losses[1] <= losses[2]


def test_pgd_50_10_is_at_most_pgd_10_at_most_clean(trained):
    model, x, y = trained
    torch.manual_seed(0)
    strong = utils.robust_accuracy(model, [(x, y)], 0.1, 0.025, 50, 10)
    weak = utils.robust_accuracy(model, [(x, y)], 0.1, 0.025, 10, 1)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert strong.clean_acc == pytest.approx(clean)
    assert strong.pgd_acc <= weak.pgd_acc <= clean
    assert 0 < strong.pgd_acc  # a meaningful model: some points survive


def plain_pgd_accuracy(model, x, y, eps, alpha, n_iters, n_restarts):
    """Full-batch PGD, every example in every restart; robust if correct clean and at each final point."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for _ in range(n_restarts):
        delta = utils.uniform_delta(x, eps)
        for _ in range(n_iters):
            grad, _ = utils.input_grad(model, x, y, delta)
            delta = utils.project(x, delta + alpha * torch.sign(grad), eps)
        with torch.no_grad():
            robust &= model(x + delta).argmax(1) == y
    return robust.float().mean().item()


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
def test_early_exit_evaluation_is_never_weaker_than_full_pgd(trained, eps):
    model, x, y = trained
    torch.manual_seed(1)
    ours = utils.robust_accuracy(model, [(x, y)], eps, eps / 4, 20, 4)
    torch.manual_seed(1)
    plain = plain_pgd_accuracy(model, x, y, eps, eps / 4, 20, 4)
    assert ours.pgd_acc <= plain
    assert ours.grad_passes < len(y) * 20 * 4


def test_per_example_cos_counts_zero_vectors_as_aligned():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    assert utils.per_example_cos(a, b).tolist() == [0.0, 1.0, 1.0, -1.0]


def test_lr_schedules():
    lr = [utils.lr_at(t, "cyclic", 0.2, 30) for t in (-0.5, 0, 6, 12, 21, 30)]
    assert lr == pytest.approx([0, 0, 0.1, 0.2, 0.1, 0])
    assert utils.lr_at(1 / 390, "cyclic", 0.2, 30) > 0
    assert [utils.lr_at(t, "piecewise", 0.1, 40) for t in (1, 19.9, 20, 29.9, 30, 40)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_periodic_metrics_leave_the_model_untouched(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = utils.periodic_metrics(model, [(x, y)], [(x, y)], 0.1, 0.025, 3, "zero")
    assert set(m) == {"test_clean_acc", "test_fgsm_acc", "test_pgd_acc", "train_pgd_acc", "cos_x_eta",
                      "cos_fgsm_pgd"}
    assert all(0 <= m[k] <= 1 for k in m if k.endswith("acc")) and all(-1 <= m[k] <= 1 for k in m if "cos" in k)
    assert m["test_pgd_acc"] <= m["test_clean_acc"] and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- GradAlign
def independent_reg(g1, g2, lam):
    g1, g2 = g1.flatten(1), g2.flatten(1)
    keep = (g1.norm(dim=1) > 0) & (g2.norm(dim=1) > 0)
    cos = F.cosine_similarity(g1[keep], g2[keep], dim=1, eps=0)
    return lam * (1 - cos.mean())


def test_gradalign_value_zero_lambda_and_exclusions():
    torch.manual_seed(0)
    g1, g2 = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    assert utils.grad_align_reg(g1, g2, 0.0).item() == 0.0
    assert utils.grad_align_reg(g1, g2, 0.7).item() == pytest.approx(independent_reg(g1, g2, 0.7).item(), abs=1e-6)
    g1[2], g2[5] = 0, 0
    value = utils.grad_align_reg(g1, g2, 1.0).item()
    keep = [i for i in range(8) if i not in (2, 5)]
    assert value == pytest.approx(independent_reg(g1[keep], g2[keep], 1.0).item(), abs=1e-6)
    assert torch.isnan(utils.grad_align_reg(torch.zeros(3, 16), g2[:3].flatten(1), 1.0))


def test_gradalign_is_zero_for_a_two_class_linear_model():
    # For f(x) = Wx + b with 2 classes, grad_x CE = (p1 - y1)(W1 - W0): always parallel to W1 - W0, and
    # with a small eta the sign of p1 - y1 does not flip, so the cosine is exactly 1.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 2, (32,))
    g1, _ = utils.input_grad(model, x, y, torch.zeros_like(x))
    g2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, 0.01), create_graph=True)
    assert abs(utils.grad_align_reg(g1, g2, 1.0).item()) < 1e-5


def test_gradalign_has_a_parameter_gradient():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    g1, _ = utils.input_grad(model, x, y, torch.zeros_like(x))
    g2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, 0.3), create_graph=True)
    reg = utils.grad_align_reg(g1, g2, 1.0)
    assert reg.dim() == 0 and reg.item() > 0
    grads = torch.autograd.grad(reg, list(model.parameters()), allow_unused=True)
    conv_grad = grads[0]
    assert conv_grad is not None and torch.isfinite(conv_grad).all() and conv_grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- models
def test_resnet18_state_dict_matches_the_reference():
    sd = models.build_model("resnet18", 10, (3, 32, 32)).state_dict()
    assert len(sd) == 108
    alias = {"model_preact_hl1.1.weight"} | {f"model_preact_hl1.2.{k}" for k in
                                             ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert alias <= set(sd)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3) and sd["linear.weight"].shape == (10, 512)
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert not any(k.startswith("layer1.0.shortcut") for k in sd)
    assert not any("bias" in k for k in sd if "conv" in k)


def test_cnn_keys():
    one = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    assert set(one) == {"_model.0.weight", "_model.0.bias", "_model.3.weight", "_model.3.bias",
                        "model_preact_hl1.0.weight", "model_preact_hl1.0.bias"}
    assert one["_model.3.weight"].shape == (10, 4 * 8 * 8)
    two = models.build_model("cnn", 10, (3, 32, 32), 2, 4).state_dict()
    assert "_model.5.weight" in two and two["_model.2.weight"].shape == (4, 4, 3, 3)


def test_reference_format_checkpoints_load_strictly(tmp_path):
    torch.manual_seed(1)
    src = models.build_model("resnet18", 10, (3, 32, 32)).eval()
    last = src.state_dict()
    path = tmp_path / "ref.pth"
    torch.save({"last": last, "best": last}, path)
    torch.manual_seed(2)
    dst = models.build_model("resnet18", 10, (3, 32, 32)).eval()
    models.load_state(dst, models.read_checkpoint(str(path), "best"))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(dst(x), src(x))
    bare = {f"module.{k}": v for k, v in last.items() if not k.startswith("model_preact_hl1")}
    torch.save(bare, tmp_path / "bare.pth")
    other = models.build_model("resnet18", 10, (3, 32, 32)).eval()
    models.load_state(other, models.read_checkpoint(str(tmp_path / "bare.pth")))
    assert torch.equal(other(x), src(x))


def test_wrong_architecture_is_named():
    sd = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    with pytest.raises(models.CheckpointError, match="missing keys"):
        models.load_state(models.build_model("resnet18", 10, (3, 32, 32)), sd)
    with pytest.raises(models.CheckpointError, match=r"_model.0.weight \(4, 1, 3, 3\) vs \(8, 1, 3, 3\)"):
        models.load_state(models.build_model("cnn", 10, (1, 8, 8), 1, 8), sd)


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, (3, 32, 32))
    conv = model.layer4[0].conv2.weight
    assert conv.std().item() == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.05)
    assert (model.layer1[0].bn1.weight == 1).all() and (model.layer1[0].bn1.bias == 0).all()
    assert (model.linear.bias == 0).all()
    assert model.linear.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.1)


@pytest.mark.parametrize("side", [25, 32, 56])
def test_resnet18_input_sides(side):
    assert models.build_model("resnet18", 10, (3, 32, 32))(torch.rand(2, 3, side, side)).shape == (2, 10)


def test_no_host_sync_in_forward():
    for cls in (models.PreActBlock, models.PreActResNet18, models.CNN, models.Normalize):
        source = inspect.getsource(cls.forward)
        assert not any(s in source for s in (".item(", ".cpu(", "numpy", ".tolist("))
