"""The attacks and their gradient maths (arXiv 2007.02617): the box clamp, the projections, the input
gradients, FGSM, PGD and the later methods' perturbations, the regularisers' terms (GradAlign, its
finite-difference form, ELLE's error), and the attack side of evaluation (robust_accuracy, the periodic
evaluation's attack_accuracy and metrics).

Evaluation: the attack loops that produce every robust accuracy are here, beside the PGD they share
with training; eval.py is the driver (checkpoints, the final evaluation, the command line) and
autoattack_eval.py adapts the optional torchattacks library. methods.py's registry says which of these
each training method uses; the device, precision and memory layout are in precision.py, file I/O is
in rundir.py.

Units: every eps and step size here is in [0, 1] image units (the command line's 1/255 units are
converted once, in config.py and eval.py). Images are (B, C, H, W) tensors with values in [0, 1].
Attacks are pure functions of (model, x, y, ...): they never switch the model between train and
eval mode, and every delta they return satisfies 0 <= x + delta <= 1 and, except N-FGSM's,
|delta|_inf <= eps: nfgsm_attack trains outside the eps-ball (|delta|_inf <= noise_mult * eps + step,
3 eps with its paper's settings). The random_corner perturbation of methods.py is a corner of the
eps-ball that is not box-clamped, as in the authors' code.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from precision import Autocast, input_layout

CLAMP_RULES = ("zero", "half")


def eval_alpha(eps: float) -> float:
    """The step of every evaluation PGD (periodic, final, eval.py): eps / 4."""
    return eps / 4


# ----------------------------------------------------------------------------------------- box clamp
class _BoxClamp(torch.autograd.Function):
    """clamp(z, 0, 1) whose backward multiplies the incoming gradient by 1 strictly inside (0, 1),
    by `at_bound` where z is exactly 0 or 1, and by 0 outside [0, 1]. The rule is written here
    rather than inherited from torch.clamp, whose gradient at the bounds differs between releases."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, at_bound: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.at_bound = at_bound
        return torch.clamp(z, 0.0, 1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        # Differentiable ops of grad_out, so a double backward through the clamp also works.
        inside = (z > 0) & (z < 1)
        if ctx.at_bound == 0.0:
            return grad_out * inside, None
        on_bound = (z == 0) | (z == 1)
        return torch.where(inside, grad_out, grad_out * (ctx.at_bound * on_bound)), None


_AT_BOUND = {"zero": 0.0, "half": 0.5}


def box_clamp(z: torch.Tensor, rule: str) -> torch.Tensor:
    """clamp(z, 0, 1) with a fixed gradient rule at the bounds, the same on every torch release.

    rule='zero': gradient 0 where z is exactly 0 or 1 (PyTorch 1.4, the paper's runs).
    rule='half': gradient 0.5 there (the authors' max/min code on PyTorch >= 1.10).
    Both give gradient 1 strictly inside (0, 1) and 0 outside [0, 1]. Values equal torch.clamp's.
    """
    if rule not in _AT_BOUND:
        raise ValueError(f"unknown clamp rule '{rule}': choose one of {', '.join(CLAMP_RULES)}")
    return _BoxClamp.apply(z, _AT_BOUND[rule])


def project(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Projects delta onto the box (0 <= x + delta <= 1), then onto the L-inf ball of radius eps."""
    return (x + delta).clamp_(0.0, 1.0).sub_(x).clamp_(-eps, eps)  # the same values as out-of-place clamps


def uniform_delta(x: torch.Tensor, eps: float) -> torch.Tensor:
    """U[-eps, eps]^d noise shaped like x (not box-projected), from the global torch RNG."""
    return torch.empty_like(x).uniform_(-eps, eps)


# ------------------------------------------------------------------------------------ input gradients
def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *,
               clamp_rule: str | None = None, create_graph: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient wrt delta of the summed cross-entropy at model(x + delta), and the logits.

    The forward sees clamp(x + delta) under `clamp_rule`, or x + delta when it is None.
    The summed loss gives each example the gradient of its own loss (the authors' batch mean
    divides it by B: same signs and cosines). create_graph keeps the graph for double backprop
    (GradAlign); otherwise the result is detached.

    Loss scaling: when `model` is an fp16 `Autocast`, the loss is multiplied by its
    `input_grad_scale` before the backward and the gradient divided by it after, so that small
    gradients do not round to zero in fp16 (the headroom of the authors' apex loss scaling). A scaled pass whose
    gradient is not finite (an fp16 overflow) is redone once in fp32, so no attack takes sign()
    of inf or NaN (in train mode that extra forward also updates BatchNorm's running statistics),
    and counted in the wrapper's `fp32_redos` (take_fp32_redos reads it); the check costs one host
    sync per fp16 pass. fp32 and bf16 passes are neither scaled nor checked.
    """
    delta = delta.detach().requires_grad_(True) if not create_graph else delta.requires_grad_(True)
    scale = model.input_grad_scale(len(y), x.device) if isinstance(model, Autocast) else None
    grad, logits = _summed_ce_grad(model, x, y, delta, clamp_rule, create_graph, scale)
    if scale is not None and not bool(torch.isfinite(grad).all()):  # the documented sync (fp16 only)
        grad, logits = _summed_ce_grad(model.model, x, y, delta, clamp_rule, create_graph, None)
        model.fp32_redos += 1  # known on the host already: counting adds no sync
    return (grad if create_graph else grad.detach()), logits.detach()


def _summed_ce_grad(model, x, y, delta, clamp_rule, create_graph, scale):
    inputs = x + delta if clamp_rule is None else box_clamp(x + delta, clamp_rule)
    logits = model(inputs)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    if scale is None:
        (grad,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
        return grad, logits
    (grad,) = torch.autograd.grad(loss * scale, delta, create_graph=create_graph)
    return grad / scale, logits


def per_example_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matching examples of a and b, (B, ...) -> (B,); 1.0 where either is zero."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    nonzero = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / torch.where(nonzero, na * nb, torch.ones_like(na))
    return torch.where(nonzero, cos, torch.ones_like(cos))


def grad_align_reg(grad1: torch.Tensor, grad2: torch.Tensor, lam: float) -> torch.Tensor:
    """GradAlign: lam * (1 - mean_i cos(grad1_i, grad2_i)), a scalar tensor.

    grad1, grad2: input gradients (B, C, H, W) at x (or the attack's start) and at x + eta.
    The mean runs over the examples where both gradients are nonzero (no epsilon in the
    normalisation, as in the authors' code); it is NaN if there is none. Differentiable wherever the
    gradients carry a graph, with no host synchronisation.
    """
    g1, g2 = grad1.flatten(1).float(), grad2.flatten(1).float()
    sq1, sq2 = (g1 * g1).sum(1), (g2 * g2).sum(1)
    keep = (sq1 != 0) & (sq2 != 0)
    one = torch.ones_like(sq1)
    norms = torch.sqrt(torch.where(keep, sq1, one)) * torch.sqrt(torch.where(keep, sq2, one))
    cos = (g1 * g2).sum(1) / norms
    keep_f = keep.to(cos.dtype)
    mean_cos = (cos * keep_f).sum() / keep_f.sum()
    return lam * (1.0 - mean_cos)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def directional_fd_surrogate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                             direction: torch.Tensor, h: float, clamp_rule: str | None = None) -> torch.Tensor:
    """A scalar whose parameter gradient approximates that of <direction, grad>, where grad is the
    input gradient of the summed cross-entropy L at x + delta (input_grad's, all examples together),
    without double backprop.

    The whole batch moves jointly along the direction V (detached), scaled by one number c, the
    largest per-example norm of V (so no example moves by more than h): the surrogate is
    c (L(x + delta + h V / c) - L(x + delta - h V / c)) / (2 h), a central difference of
    <V, grad> = sum_j <v_j, d L / d x_j>. Because the batch moves together, the terms through which
    train-mode BatchNorm couples the examples (example k's loss depends on x_j through the batch
    statistics) get the same weights as in the exact gradient. The forward sees the points clamped
    under `clamp_rule`, or raw when None. Error O(h^2) where L is smooth in (x, theta); h in [0, 1]
    input units. Costs two forward+backward passes of the batch; the two forwards run in the model's
    current mode (train mode updates BatchNorm's running statistics twice).
    """
    v = direction.detach().flatten(1).float()
    scale = v.norm(dim=1).max()
    unit = (v / torch.where(scale > 0, scale, torch.ones_like(scale))).view_as(delta).to(x.dtype)
    base = x + delta.detach()
    losses = []
    for sign in (1.0, -1.0):
        point = base + sign * h * unit
        logits = model(point if clamp_rule is None else box_clamp(point, clamp_rule))
        losses.append(F.cross_entropy(_at_least_fp32(logits), y, reduction="sum"))
    return scale * (losses[0] - losses[1]) / (2 * h)


def grad_align_reg_fd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grad1: torch.Tensor,
                      grad2: torch.Tensor, delta2: torch.Tensor, lam: float, h: float, *,
                      delta1: torch.Tensor | None = None, clamp_rule1: str | None = None) -> torch.Tensor:
    """GradAlign's regulariser with a finite-difference parameter gradient instead of double backprop.

    Value: exactly grad_align_reg(grad1, grad2, lam) (the gradients are used detached). Parameter
    gradient: by the chain rule d reg / d theta = <V, d grad2 / d theta> (+ the same for grad1), with
    V = d reg / d grad2 held fixed; that is the parameter gradient of <V, grad2>, which
    directional_fd_surrogate approximates with a central difference of step h (in [0, 1] input units)
    moving the whole batch jointly along V. grad2 is the input gradient at x + delta2 (no clamp), as
    train.py computes it; grad1 gets its term only when delta1 is given (grad1 at x + delta1 under
    clamp_rule1), otherwise it is treated as a constant, as the detached FGSM gradient is. Shapes
    (B, C, H, W). Cost: 2 forward+backward passes per differentiated gradient, no double backprop.

    Accuracy: where the network is smooth the error of the gradient is O(h^2), BatchNorm in train
    mode included, until rounding dominates; so it needs fp32 or better: in fp16 or bf16 the
    difference of two losses over 2h is mostly rounding noise (refuse_fd_in_half_precision). A ReLU
    network differs: double backprop treats its kinks as flat, while the difference sees every kink
    within h of a point, so the two agree only for h below the distance to the nearest kink (about
    1e-5 and float64 on a small CNN); at the h that fp32 allows, this is a smoothed variant, not the
    same gradient.
    """
    g1 = grad1.detach().float().requires_grad_(delta1 is not None)
    g2 = grad2.detach().float().requires_grad_(True)
    with torch.enable_grad():
        value = grad_align_reg(g1, g2, lam)
        wrt = [g2] + ([g1] if delta1 is not None else [])
        dirs = torch.autograd.grad(value, wrt)
    surrogate = directional_fd_surrogate(model, x, y, delta2, dirs[0], h)
    if delta1 is not None:
        surrogate = surrogate + directional_fd_surrogate(model, x, y, delta1, dirs[1], h, clamp_rule1)
    return value.detach() + (surrogate - surrogate.detach())


def refuse_fd_in_half_precision(grad_align_fd: float, half_prec: bool) -> str | None:
    """The error message when the finite-difference GradAlign gradient is asked for in half precision
    (the difference of two fp16 or bf16 losses over 2h is mostly rounding noise), else None."""
    if grad_align_fd > 0 and half_prec:
        return ("--grad_align_fd needs fp32: in half precision its finite difference is mostly rounding noise; "
                "drop --half_prec or --grad_align_fd")
    return None


# -------------------------------------------------------------------------------------------------- ELLE
def elle_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """ELLE's local-linearity error (Abad Rocamora et al., ICLR 2024, arXiv 2401.11618), a scalar tensor.

    Threat model: the L-inf ball of radius eps (in [0, 1] units) intersected with the box [0, 1]. For
    each example, x_a and x_b are drawn uniformly from the eps-ball around x and projected onto the box,
    a ~ U[0, 1], and x_c = a x_a + (1 - a) x_b (in the ball and the box, both being convex). The error
    is mean_i (l(x_c) - a l(x_a) - (1 - a) l(x_b))^2, with l the per-example cross-entropy (or
    loss_fn(logits, y) -> (B,)). The three points go through the model in one forward of 3B examples;
    the result carries the graph of that forward only: its parameter gradient needs no double
    backprop. It is 0 for a loss that is affine in the input, > 0 for a curved one.
    """
    b = len(x)
    ends = x.repeat(2, *([1] * (x.dim() - 1)))
    ends = torch.clamp(ends + torch.empty_like(ends).uniform_(-eps, eps), 0.0, 1.0)
    a = torch.rand((b,) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
    x_c = a * ends[:b] + (1 - a) * ends[b:]
    logits = _at_least_fp32(model(torch.cat([ends, x_c])))
    yy = y.repeat(3)
    losses = F.cross_entropy(logits, yy, reduction="none") if loss_fn is None else loss_fn(logits, yy)
    la, lb, lc = losses[:b], losses[b:2 * b], losses[2 * b:]
    a = a.flatten().to(losses.dtype)
    return ((lc - a * la - (1 - a) * lb) ** 2).mean()


@dataclass
class ElleAdaptive:
    """ELLE-A's lambda: lam_max when the error spikes, otherwise the previous lambda times `decay`.

    A spike is an error above mean + sensitivity * std of every earlier error of the run (population
    std; at least 3 earlier errors are needed), lambda starts at 0, and the paper's values are
    decay 0.99 and sensitivity 2. As in the authors' released code (the rule runs after the step's
    backward), the lambda set from step t's error first scales step t + 1's regulariser: update()
    returns the lambda set by the previous call. The running mean and std (Welford) are tensors on
    the error's device: update() makes no host synchronisation. state_dict: count, the lambda for
    the next step, and the statistics.
    """
    lam_max: float
    decay: float = 0.99
    sensitivity: float = 2.0
    count: int = 0
    lam: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, error: torch.Tensor) -> torch.Tensor:
        """Returns the lambda of this step (a 0-dim tensor: the one set from the previous step's
        error, 0 at the first step); then sets the next step's lambda from this step's error (a
        detached scalar) and adds the error to the statistics."""
        error = error.detach().float()
        if self.lam is None:
            self.lam, self.mean, self.m2 = (torch.zeros_like(error) for _ in range(3))
        current = self.lam
        std = torch.sqrt(self.m2 / max(self.count, 1))
        spike = (error > self.mean + self.sensitivity * std) & (self.count > 2)
        self.lam = torch.where(spike, torch.full_like(error, self.lam_max), self.decay * self.lam)
        self.count += 1
        diff = error - self.mean
        self.mean = self.mean + diff / self.count
        self.m2 = self.m2 + diff * (error - self.mean)
        return current

    def current(self, error: torch.Tensor) -> torch.Tensor:
        """The lambda update() would return now, leaving the statistics as they are (0 before the first
        update: the authors' statistics start at the first training step)."""
        return torch.zeros_like(error.detach().float()) if self.lam is None else self.lam

    def state_dict(self) -> dict:
        return {"count": self.count, "lam": self.lam, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.lam, self.mean, self.m2 = state["count"], state["lam"], state["mean"], state["m2"]


# --------------------------------------------------------------------------------------------- attacks
def fgsm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta0: torch.Tensor, eps: float,
                step: float, clamp_rule: str | None, *, create_graph: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FGSM step from delta0 (training: FGSM, FGSM-RS, Free-AT and ELLE's attack).

    The gradient is taken at clamp(x + delta0) under `clamp_rule` (the paper's code), or at x + delta0
    with no clamp in the graph when clamp_rule is None (ELLE's code: from its zero start that is x
    itself, so a pixel at exactly 0 or 1 gets its real gradient under either --clamp_grad rule).
    The step is step * sign(grad) (step = fgsm_alpha * eps), clipped to [-eps, eps] and projected
    onto the box.
    Returns (delta, grad at delta0); delta is detached, and so is grad unless create_graph keeps its
    graph (GradAlign backpropagating through this gradient too).
    """
    grad, _ = input_grad(model, x, y, delta0, clamp_rule=clamp_rule, create_graph=create_graph)
    delta = torch.clamp(delta0.detach() + step * torch.sign(grad.detach()), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad


def zero_smallest(grad: torch.Tensor, q: float) -> torch.Tensor:
    """ZeroGrad's filter: in each example of grad (B, ...), every coordinate whose |value| is strictly
    below the example's q-quantile of |grad| is set to 0, the rest kept.

    The quantile is torch.quantile's default (linear interpolation between the order statistics at
    floor and ceil of q * (d - 1), d coordinates per example), as in the authors' code; with distinct
    values that zeroes the ceil(q * (d - 1)) smallest. q in [0, 1): 0 returns grad unchanged. Shapes
    and dtype are kept; computed with a sort, with no host synchronisation.
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"ZeroGrad's quantile must be in [0, 1) (got {q})")
    if q == 0.0:
        return grad
    flat = grad.flatten(1)
    size = flat.abs()
    rank = q * (flat.shape[1] - 1)
    low = int(rank)
    ordered = size.sort(dim=1).values
    high = min(low + 1, flat.shape[1] - 1)
    threshold = torch.lerp(ordered[:, low:low + 1], ordered[:, high:high + 1], rank - low)
    return torch.where(size < threshold, torch.zeros_like(flat), flat).view_as(grad)


def zerograd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta0: torch.Tensor, eps: float,
                    step: float, q: float, *, create_graph: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZeroGrad (Golgooni et al., arXiv 2103.15476): FGSM whose small gradient coordinates do not move.

    Threat model: L-inf ball of radius eps (in [0, 1] units) intersected with the box [0, 1].
    As in the authors' code, the start delta0 is first projected onto the box (start = clamp(x +
    delta0, 0, 1) - x) and the gradient g is taken at x + start with no clamp in the graph, so every
    pixel, saturated or not, gets its real gradient whatever --clamp_grad says. In each example the
    coordinates with |g| below the q-quantile are zeroed (zero_smallest), and the step is
    step * sign(filtered g) (a zeroed coordinate keeps its start value), clipped to [-eps, eps] and
    projected onto the box. x, delta0: (B, C, H, W); q in [0, 1).
    Returns (delta, g at the start before filtering, start): |delta|_inf <= eps and 0 <= x + delta <= 1;
    delta and start are detached, g too unless create_graph.
    """
    start = torch.clamp(x + delta0.detach(), 0.0, 1.0) - x
    grad, _ = input_grad(model, x, y, start, create_graph=create_graph)
    kept = zero_smallest(grad.detach(), q)
    delta = torch.clamp(start + step * torch.sign(kept), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad, start.detach()


def nfgsm_noise(x: torch.Tensor, eps: float, noise_mult: float) -> torch.Tensor:
    """N-FGSM's start: U[-k eps, k eps]^d noise shaped like x (k = noise_mult), projected onto the box
    (0 <= x + noise <= 1) but not onto any eps-ball. From the global torch RNG."""
    noise = torch.empty_like(x).uniform_(-noise_mult * eps, noise_mult * eps)
    return torch.clamp(x + noise, 0.0, 1.0) - x


def nfgsm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, noise_mult: float,
                 step: float, *, create_graph: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N-FGSM (de Jorge et al., NeurIPS 2022, arXiv 2202.01181): noise, one signed step, no projection.

    Threat model trained on: NOT the eps-ball. Start eta = nfgsm_noise(x, eps, noise_mult) (so
    |eta|_inf <= noise_mult * eps, default 2 eps), gradient g of the cross-entropy at x + eta (a point
    already in the box, so no clamp in the forward), delta = eta + step * sign(g) (step = alpha * eps,
    alpha 1 in the paper), projected onto the box only. So |delta|_inf <= noise_mult * eps + step
    (3 eps with the paper's settings) and 0 <= x + delta <= 1. eps, step in [0, 1] units; x (B, C, H, W).
    Returns (delta, g at eta, eta); delta and eta are detached, g too unless create_graph.
    """
    eta = nfgsm_noise(x, eps, noise_mult)
    grad, _ = input_grad(model, x, y, eta, create_graph=create_graph)
    eta = eta.detach()
    delta = eta + step * torch.sign(grad.detach())
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad, eta


def multigrad_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, samples: int,
                     agree: int, *, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MultiGrad (Golgooni et al., arXiv 2103.15476, the second method of ZeroGrad's paper): FGSM steps
    only along the coordinates whose gradient sign is stable around x.

    Threat model: L-inf ball of radius eps (in [0, 1] units) intersected with the box [0, 1].
    `samples` starts delta_i ~ U[-eps, eps]^d, each projected onto the box, and the input gradient g_i
    at each (a separate train-mode forward per sample, no clamp in the graph, as the authors' default
    sequential mode). The votes v = sum_i sign(g_i) keep a coordinate where |v| >= 2 agree - samples,
    i.e. where at least `agree` of the signs agree (agree = samples: all of them), and zero it
    elsewhere. The step starts from zero, not from the samples: delta = clip(step * sign(v), -eps,
    eps) on the kept coordinates (so eps sign(v) when step >= eps) and 0 on the others, then projected
    onto the box. x: (B, C, H, W); 1 <= agree <= samples.
    Returns (delta, g_1, delta_1): the first sample's gradient and start (GradAlign's first gradient
    and the run's gradient statistics); delta and delta_1 detached, g_1 too unless create_graph.
    """
    votes = torch.zeros_like(x)
    first_grad = first_start = None
    for i in range(samples):
        start = torch.clamp(x + uniform_delta(x, eps), 0.0, 1.0) - x
        grad, _ = input_grad(model, x, y, start, create_graph=create_graph and i == 0)
        votes += torch.sign(grad.detach())
        if i == 0:
            first_grad, first_start = grad, start
    kept = torch.where(votes.abs() < 2 * agree - samples, torch.zeros_like(votes), votes)
    delta = torch.clamp(step * torch.sign(kept), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, first_grad, first_start


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
               n_iters: int, *, random_start: bool, clamp_rule: str | None = None) -> torch.Tensor:
    """L-inf PGD: n_iters sign-ascent steps of size alpha on the cross-entropy, one restart.

    Start: 0, or U[-eps, eps] (not box-projected before the first gradient). After each step:
    box, then eps-ball. The forward sees clamp(x + delta) under `clamp_rule` (training) or the raw
    x + delta (clamp_rule=None: evaluation). n_iters=0 returns zeros. Serves PGD training, the
    periodic evaluation (FGSM is n_iters=1, alpha=eps, zero start) and the final evaluation.
    """
    if n_iters == 0:
        return torch.zeros_like(x)
    delta = uniform_delta(x, eps) if random_start else torch.zeros_like(x)
    for _ in range(n_iters):
        grad, _ = input_grad(model, x, y, delta, clamp_rule=clamp_rule)
        delta = project(x, delta.detach() + alpha * grad.sign_(), eps)
    return delta


@dataclass
class RobustEval:
    """Outcome of robust_accuracy: fractions in [0, 1] and the attack's cost."""
    clean_acc: float
    pgd_acc: float
    n_eval: int
    grad_passes: int  # forward+backward passes, counted per example
    robust: torch.Tensor | None = field(default=None, repr=False)  # per example, in input order (bool, on the device)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float,
                    alpha: float, n_iters: int, n_restarts: int, progress: Callable | None = None
                    ) -> RobustEval:
    """Clean and PGD-`n_iters`-`n_restarts` accuracy (the final evaluation).

    An example counts as robust only if it is classified correctly clean and at every iterate
    (after the first step) and final point of every restart. That rule is at least as strong as
    the authors' (which keeps the max-loss restart), so it may stop early: an example already
    broken gets no more steps or restarts. Each restart's random start is drawn for the whole batch,
    all restarts' starts before the first step and in restart order, so every example follows the
    same trajectories as in a plain full-batch PGD, whichever restarts run together (below).
    The caller puts the model in eval mode and fp32; inputs take the layout of its weights (input_layout).

    Cost: the examples still attacked are kept as one packed batch, gathered again only at a step that
    fooled some of them (no gather or scatter per step); one host sync per step (is any example fooled?).
    Restart packing: when at most half of the largest batch so far is still robust, the next
    restarts of the survivors run side by side in one batch (as many restarts as fit into that batch
    size), and an example leaves with all its copies when any copy is fooled. The verdicts are those
    of one restart after another: in eval mode an example's pass does not depend on the rest of its
    batch, so each trajectory is the same, and a verdict only asks whether any iterate of any restart
    fools the example. The pass count differs, and the number of sequential steps for the survivors
    falls from n_iters x restarts to about n_iters x 2 when few survive.
    """
    layout = input_layout(model)
    n_clean = n_robust = n_total = passes = capacity = 0
    verdicts = []
    for x_batch, y in batches:
        x = x_batch.contiguous(memory_format=layout)
        capacity = max(capacity, len(y))
        robust = _predict(model, x) == y
        n_clean += int(robust.sum())
        starts = [uniform_delta(x, eps) if n_iters > 0 else torch.zeros_like(x) for _ in range(n_restarts)]
        done = 0  # restarts run so far
        while done < n_restarts:
            alive = robust.nonzero().squeeze(1)  # the batch positions still attacked
            if alive.numel() == 0:
                break
            together = min(n_restarts - done, max(1, capacity // alive.numel()))
            idx = alive.repeat(together)  # copy j of an example runs restart done + j
            xa, ya = x[idx], y[idx]
            delta = torch.cat([starts[done + j][alive] for j in range(together)])
            done += together
            for step in range(n_iters):
                passes += idx.numel()
                grad, logits = input_grad(model, xa, ya, delta)
                if step > 0:  # logits at a feasible point (the start is not box-projected)
                    correct = logits.argmax(1) == ya
                    if not bool(correct.all()):
                        robust[idx[~correct]] = False
                        keep = robust[idx].nonzero().squeeze(1)  # every copy of a fooled example leaves
                        idx, xa, ya, delta, grad = idx[keep], xa[keep], ya[keep], delta[keep], grad[keep]
                        if idx.numel() == 0:
                            break
                delta = project(xa, delta.add_(grad.sign_(), alpha=alpha), eps)
            if idx.numel() > 0:
                robust[idx[_predict(model, xa + delta) != ya]] = False
        n_robust += int(robust.sum())
        n_total += len(y)
        verdicts.append(robust)
        if progress is not None:
            progress(len(y))
    return RobustEval(n_clean / n_total, n_robust / n_total, n_total, passes, torch.cat(verdicts))


def seeded_robust_accuracy(model: nn.Module, batches, eps: float, n_iters: int, n_restarts: int, seed: int,
                           progress: Callable | None = None) -> RobustEval:
    """robust_accuracy with step eps/4 from a freshly seeded RNG: train.py's final evaluation and
    eval.py give the same numbers for the same points, batch size, seed and device."""
    torch.manual_seed(seed)
    return robust_accuracy(model, batches, eps, eval_alpha(eps), n_iters, n_restarts, progress)


# ----------------------------------------------------------------------------- periodic evaluation
@dataclass
class AttackAccuracy:
    """Outcome of attack_accuracy: fractions in [0, 1] and the deltas, one tensor per batch."""
    adv_acc: float                # correct at x + delta
    clean_acc: float | None       # correct at x (with clean=True)
    robust_acc: float | None      # correct at both (with clean=True)
    n_eval: int
    deltas: list[torch.Tensor]


def attack_accuracy(model: nn.Module, batches, eps: float, alpha: float, n_iters: int, *, random_start: bool,
                    clean: bool = False, progress: Callable | None = None) -> AttackAccuracy:
    """Accuracy under one full PGD run per batch (pgd_attack: every example takes every step).

    The periodic evaluation uses it (it needs the deltas for cos_fgsm_pgd, and its random starts
    are drawn in the order of the authors' loop), as does eval.py's zero-start attack. The final
    evaluation's robust_accuracy is the other loop, on purpose: several restarts, and an example
    stops being attacked once it is fooled. clean=True also predicts at x (before the attack).
    """
    n_adv = n_clean = n_robust = n = 0
    deltas = []
    layout = input_layout(model)
    for x_batch, y in batches:
        x = x_batch.contiguous(memory_format=layout)
        ok = _predict(model, x) == y if clean else None
        delta = pgd_attack(model, x, y, eps, alpha, n_iters, random_start=random_start)
        adv = _predict(model, x + delta) == y
        n_adv += int(adv.sum())
        if ok is not None:
            n_clean, n_robust = n_clean + int(ok.sum()), n_robust + int((ok & adv).sum())
        n += len(y)
        deltas.append(delta)
        if progress is not None:
            progress(len(y))
    denominator = max(n, 1)
    return AttackAccuracy(n_adv / denominator, n_clean / denominator if clean else None,
                          n_robust / denominator if clean else None, n, deltas)


def _grads(model, batches, eps, clamp_rule, at_random_point):
    grads, layout = [], input_layout(model)
    for x_batch, y in batches:
        x = x_batch.contiguous(memory_format=layout)
        delta = uniform_delta(x, eps) if at_random_point else torch.zeros_like(x)
        grads.append(input_grad(model, x, y, delta, clamp_rule=clamp_rule)[0])
    return grads


def _mean_cos(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    cos = torch.cat([per_example_cos(a, b) for a, b in zip(first, second)])
    return float(cos.mean()) if cos.numel() else float("nan")


def periodic_metrics(model: nn.Module, test_batches, train_batches, eps: float, alpha: float,
                     attack_iters: int, clamp_rule: str) -> dict[str, float]:
    """The periodic evaluation of the authors' training loop, in its order of random draws.

    Test subset: clean, FGSM (one step of eps from zero) and PGD-`attack_iters` (step alpha, one
    random restart) accuracy, and cos_fgsm_pgd between their deltas; training subset: PGD accuracy
    (for early stopping); then cos_x_eta between input gradients at clamp(x) and clamp(x + eta).
    The caller sets eval mode (and the training precision).
    """
    test_clean = attack_accuracy(model, test_batches, eps, alpha, 0, random_start=True)
    test_fgsm = attack_accuracy(model, test_batches, eps, eps, 1, random_start=False)
    test_pgd = attack_accuracy(model, test_batches, eps, alpha, attack_iters, random_start=True)
    train_pgd = attack_accuracy(model, train_batches, eps, alpha, attack_iters, random_start=True)
    grad_x = _grads(model, test_batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, test_batches, eps, clamp_rule, at_random_point=True)
    return {"test_clean_acc": test_clean.adv_acc, "test_fgsm_acc": test_fgsm.adv_acc, "test_pgd_acc": test_pgd.adv_acc,
            "train_pgd_acc": train_pgd.adv_acc, "cos_x_eta": _mean_cos(grad_x, grad_eta),
            "cos_fgsm_pgd": _mean_cos(test_fgsm.deltas, test_pgd.deltas)}


def cos_x_eta(model: nn.Module, batches, eps: float, clamp_rule: str) -> float:
    """Mean cosine between input gradients at clamp(x) and clamp(x + eta), eta ~ U[-eps, eps]^d."""
    grad_x = _grads(model, batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, batches, eps, clamp_rule, at_random_point=True)
    return _mean_cos(grad_x, grad_eta)


# ----------------------------------------------------------------------------------- moved names
# Re-exported for one release: the device, precision and memory-layout names live in precision.py now
# (import them from there). lr_at lives in train.py, above this module: utils.lr_at names it (below).
from precision import (  # noqa: E402, F401
    HALF_PREC_DTYPES,
    INIT_LOSS_SCALE,
    LAYOUT_CHOICES,
    LAYOUT_MIN_GAIN,
    LAYOUT_PASSES,
    LAYOUTS,
    autocast_dtype,
    cuda_problem,
    device_choice,
    layout_copy,
    layout_names,
    pass_layouts,
    precision_name,
    resolve_device,
    set_layout,
    set_tf32,
    take_fp32_redos,
    to_device,
)


def __getattr__(name: str):
    """For one release, utils.lr_at names its new home (train.py imports this module, not the reverse)."""
    if name == "lr_at":
        raise AttributeError("utils.lr_at is train.lr_at now (the learning-rate schedule is the trainer's): "
                             "import train and call train.lr_at")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
