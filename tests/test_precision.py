"""The paper's precision path, checked on the CPU: the box-clamp rule on any torch, loss scaling of
the fp16 input-gradient passes, BatchNorm in fp32 under GradAlign, skipped non-finite fp16 steps,
--half_prec_dtype and --tf32. float16 autocast runs on the CPU, so these are CUDA's numerics."""
from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods
import precision
import train
import utils
from tests.fixtures import TINY, trained_digits_cnn

CPU = torch.device("cpu")
Z = [-0.5, 0.0, 0.5, 1.0, 1.5]
RULE_GRADS = {"zero": [0.0, 0.0, 1.0, 0.0, 0.0], "half": [0.0, 0.5, 1.0, 0.5, 0.0]}


# ----------------------------------------------------------------------------------------- box clamp
class _ClampGradOneAtBounds(torch.autograd.Function):
    """torch.clamp as torch 2.13.0 differentiates it: gradient 1 on [lo, hi], bounds included."""

    @staticmethod
    def forward(ctx, z, lo, hi, clamp):
        ctx.save_for_backward(z)
        ctx.lo, ctx.hi = lo, hi
        return clamp(z, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * ((z >= ctx.lo) & (z <= ctx.hi)).to(grad.dtype), None, None, None


@pytest.fixture
def clamp_like_torch_2_13(monkeypatch):
    original = torch.clamp

    def clamp(z, lo=None, hi=None):
        return _ClampGradOneAtBounds.apply(z, lo, hi, original)
    monkeypatch.setattr(torch, "clamp", clamp)
    z = torch.tensor(Z, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp(z, 0.0, 1.0).sum(), z)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # the patch is in effect: torch.clamp's own rule changed


@pytest.mark.parametrize("rule", ["zero", "half"])
def test_box_clamp_rule_does_not_follow_torch_clamps_backward(clamp_like_torch_2_13, rule):
    z = torch.tensor(Z, requires_grad=True)
    out = utils.box_clamp(z, rule)
    (g,) = torch.autograd.grad(out.sum(), z)
    assert g.tolist() == RULE_GRADS[rule]
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("rule", ["zero", "half"])
def test_zero_init_fgsm_step_follows_the_rule_under_a_changed_torch_clamp(clamp_like_torch_2_13, rule):
    # logits = (-sum(x), 0) and y = 0: d CE / dx_i = p_1 > 0, the same for every coordinate, so the
    # attack's gradient at delta = 0 divided by it is the clamp's gradient at z = x.
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(5), torch.zeros(5)]))
        model[1].bias.zero_()
    x, y = torch.tensor(Z).view(1, 1, 1, 5), torch.tensor([0])
    cfg, _ = train.parse_config(TINY + ["--attack", "fgsm", "--attack_init", "zero", "--clamp_grad", rule])
    pert = methods.perturb_fgsm(model, x, y, cfg, train.StepState())
    p1 = torch.softmax(model(x.clamp(0, 1)), 1)[0, 1]
    assert torch.allclose(pert.attack_grad.flatten() / p1, torch.tensor(RULE_GRADS[rule]), rtol=1e-6, atol=0)
    moved = (pert.delta.flatten() != 0).tolist()  # the step is +eps: at 0 it moves only under 'half'
    assert moved[1] == (rule == "half") and moved[2]


# ------------------------------------------------------------------------------- fp16 loss scaling
@pytest.fixture(scope="module")
def confident():
    """A one-layer CNN trained on digits whose last layer is scaled so that correct test digits have
    logit margins of ~21 nats; 32 of them with margins in (20, 22)."""
    model, x, y = trained_digits_cnn()
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def margins():
        top2 = model(x[1000:]).topk(2, 1).values
        return top2[:, 0] - top2[:, 1], model(x[1000:]).argmax(1) == y[1000:]
    margin, correct = margins()
    factor = 21.0 / margin[correct].median()
    linear.weight.mul_(factor)
    linear.bias.mul_(factor)
    margin, correct = margins()
    pick = (correct & (margin > 20) & (margin < 22)).nonzero().squeeze(1)[:32]
    assert len(pick) == 32
    return model, x[1000:][pick], y[1000:][pick]


def _all_zero_examples(grad: torch.Tensor) -> int:
    return int((grad.flatten(1) == 0).all(1).sum())


def test_fp16_scaled_input_gradients_keep_confident_examples(confident):
    model, x, y = confident
    zero = torch.zeros_like(x)
    g32, _ = utils.input_grad(model, x, y, zero)
    unscaled, _ = utils.input_grad(precision.Autocast(model, "cpu", torch.float16, scale_input_grads=False), x, y, zero)
    scaled, _ = utils.input_grad(precision.Autocast(model, "cpu", torch.float16), x, y, zero)
    assert _all_zero_examples(g32) == 0
    assert _all_zero_examples(unscaled) > 0  # e^-20 is below fp16's smallest number
    assert _all_zero_examples(scaled) == 0
    big = g32.flatten(1).abs() > 1e-3 * g32.flatten(1).abs().amax(1, keepdim=True)
    agree = torch.sign(scaled.flatten(1)) == torch.sign(g32.flatten(1))
    assert agree[big].float().mean() >= 0.99
    assert scaled.dtype == torch.float32 and torch.isfinite(scaled).all()


def test_scale_follows_the_training_grad_scaler(confident):
    model = confident[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    fwd = precision.Autocast(model, "cpu", torch.float16, scaler=scaler)
    assert float(fwd.input_grad_scale(32, CPU)) == 2.0 ** 10 / 32
    assert precision.Autocast(model, "cpu", torch.float16).input_grad_scale(32, CPU) == 2.0 ** 16 / 32
    assert precision.Autocast(model, "cpu", torch.bfloat16, scaler=scaler).input_grad_scale(32, CPU) is None


def test_fp16_overflow_is_redone_in_fp32(confident):
    model, x, y = confident
    delta = torch.zeros_like(x)
    g32, logits32 = utils.input_grad(model, x, y, delta)
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # the scaled loss overflows fp16
    g, logits = utils.input_grad(precision.Autocast(model, "cpu", torch.float16, scaler=huge), x, y, delta)
    assert torch.equal(g, g32) and torch.equal(logits, logits32)


@pytest.mark.parametrize("clamp_rule, create_graph", [(None, False), ("zero", False), (None, True)])
def test_fp32_and_bf16_input_gradients_are_bit_identical_to_the_unscaled_formula(confident, clamp_rule,
                                                                                 create_graph):
    model, x, y = confident
    delta = utils.uniform_delta(x, 0.1)
    for fwd in (model, precision.Autocast(model, "cpu", torch.bfloat16)):
        grad, _ = utils.input_grad(fwd, x, y, delta.clone(), clamp_rule=clamp_rule, create_graph=create_graph)
        d = delta.clone().requires_grad_(True)
        inputs = x + d if clamp_rule is None else utils.box_clamp(x + d, clamp_rule)
        (expected,) = torch.autograd.grad(F.cross_entropy(fwd(inputs).float(), y, reduction="sum"), d)
        assert torch.equal(grad, expected)


# ------------------------------------------------------------------------------ BatchNorm in fp32
class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 8 * 8, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("lam, bn_input", [("0.5", torch.float32), ("0", torch.float16)])
def test_batchnorm_runs_in_fp32_under_gradalign_and_fp16(lam, bn_input):
    torch.manual_seed(0)
    cfg, _ = train.parse_config(TINY + ["--attack", "fgsm", "--attack_init", "zero", "--half_prec",
                                        "--half_prec_dtype", "float16", "--grad_align_cos_lambda", lam])
    model = TinyBN().train()
    seen, after = [], []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    model.body[3].register_forward_pre_hook(lambda mod, args: after.append(args[0].dtype))  # the conv after BN
    opt = train.make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu")
    fwd = precision.forward_model(cfg, model, CPU, scaler)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    st, stats = train.StepState(), train.Stats(CPU)
    train.train_step(fwd, opt, scaler, x, y, cfg, st, stats, update=True)
    forwards = 3 if lam != "0" else 2  # attack, training (and grad2 with GradAlign)
    assert len(seen) == 2 * forwards and set(seen) == {bn_input}
    assert len(after) == forwards and set(after) == {torch.float16}  # BatchNorm's output is back in fp16
    assert float(st.skipped) == 0
    if lam != "0":  # the double backward through fp32 BatchNorm ran and moved every weight
        assert stats.means()["train_reg"] > 0
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not model.body[1]._forward_pre_hooks and len(model.body[1]._forward_hooks) == 1  # only the test's


# --------------------------------------------------------------------------- skipped fp16 steps
def _inject_nan_training_loss(monkeypatch, at_call: int) -> None:
    """train.py's own cross-entropy (the training loss) returns NaN at its `at_call`-th call."""
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] == at_call else loss
    monkeypatch.setattr(train, "F", types.SimpleNamespace(cross_entropy=cross_entropy))


def test_a_nonfinite_fp16_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _inject_nan_training_loss(monkeypatch, at_call=3)  # iteration 2: epoch 1's second step
    args = TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm", "--half_prec", "--half_prec_dtype", "float16"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    run_dir = os.path.join(str(tmp_path), train.run_name(cfg, defaults))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(r["iteration"], r["skipped_steps"]) for r in rows] == [(0, 0), (2, 1), (4, 0)]
    assert not [k for r in rows for k, v in r.items() if isinstance(v, float) and math.isnan(v)]
    weights = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)["last"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["half_prec_dtype"] == "float16" and config["tf32"] is False


def test_a_nonfinite_fp32_loss_still_stops_with_exit_4(tmp_path, monkeypatch, capsys):
    _inject_nan_training_loss(monkeypatch, at_call=3)
    assert train.main(TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm"]) == train.EXIT_NONFINITE
    assert "NaN or inf at iteration 2" in capsys.readouterr().err


def test_a_hundred_skipped_steps_in_a_row_stop_the_run():
    model = nn.Linear(2, 2)
    guard = precision.FiniteGuard(scaling=True, device=CPU)
    for i in range(60 + precision.MAX_SKIPPED_IN_A_ROW):
        skipped = torch.tensor(0.0 if i in (3, 50) else 1.0)  # runs of 46 and 49, then 100+ from 51
        guard.count(torch.tensor(float("nan")), skipped, i)
        if i < 50 + precision.MAX_SKIPPED_IN_A_ROW:
            guard.check(model, i)
    assert int(guard.stalled_at) == 50 + precision.MAX_SKIPPED_IN_A_ROW
    with pytest.raises(precision.NonFiniteLoss, match="in a row"):
        guard.check(model, 0)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(precision.NonFiniteLoss, match="weights"):
        precision.FiniteGuard(scaling=False, device=CPU).check(model, 0)


def test_the_guard_state_round_trips_and_an_older_state_without_float16_counters_loads():
    guard = precision.FiniteGuard(scaling=True, device=CPU)
    for i in range(5):
        guard.count(torch.tensor(1.0), torch.tensor(float(i > 1)), i)
    restored = precision.FiniteGuard(scaling=True, device=CPU)
    restored.load_state_dict(guard.state_dict())
    assert {k: int(v) for k, v in restored.state_dict().items()} == {
        "first_bad_iter": -1, "skipped_steps": 3, "skipped_in_a_row": 3, "stalled_at": -1}
    older = precision.FiniteGuard(scaling=True, device=CPU)
    older.load_state_dict({"first_bad_iter": torch.tensor(7)})
    assert (int(older.first_bad_iter), int(older.skipped_steps), int(older.stalled_at)) == (7, 0, -1)
    assert guard.take_skipped() == 3 and guard.take_skipped() == 0


# ------------------------------------------------------------------------- flags and GradScaler
def test_half_prec_dtype_picks_the_autocast_dtype_and_the_grad_scaler():
    for extra, dtype in [([], torch.bfloat16), (["--half_prec_dtype", "float16"], torch.float16),
                         (["--half_prec_dtype", "bfloat16"], torch.bfloat16)]:
        cfg, _ = train.parse_config(TINY + ["--half_prec", *extra])
        assert precision.half_prec_dtype(cfg, CPU) == dtype
        fwd = precision.forward_model(cfg, nn.Linear(2, 2), CPU, torch.amp.GradScaler("cpu"))
        assert fwd.dtype == dtype and fwd.scale_input_grads == (dtype == torch.float16)
    assert precision.autocast_dtype("cuda") == torch.float16
    cfg, _ = train.parse_config(TINY)
    assert precision.forward_model(cfg, nn.Linear(2, 2), CPU, torch.amp.GradScaler("cpu")).__class__ is nn.Linear


def test_tf32_is_off_unless_asked():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    precision.to_device(nn.Linear(2, 2), CPU)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    precision.to_device(nn.Linear(2, 2), CPU, tf32=True)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    precision.set_tf32(False)
