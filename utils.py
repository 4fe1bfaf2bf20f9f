"""Shared pieces: the box clamp, attacks, GradAlign, metrics, learning rates, precision and file I/O.

Units: every eps and step size here is in [0, 1] image units (the command line's 1/255 units are
converted once, in train.py and eval.py). Images are (B, C, H, W) tensors with values in [0, 1].
Attacks are pure functions of (model, x, y, ...): they never switch the model between train and
eval mode, and every delta they return satisfies |delta|_inf <= eps and 0 <= x + delta <= 1
(SPEC §3.1 item 6 records the one exception, random_corner, in train.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLAMP_RULES = ("zero", "half")


# ----------------------------------------------------------------------------------------- box clamp
def box_clamp(z: torch.Tensor, rule: str) -> torch.Tensor:
    """clamp(z, 0, 1) with the gradient rule of SPEC §3.0 at the bounds.

    rule='zero': gradient 0 where z is exactly 0 or 1 (PyTorch 1.4, the paper's runs).
    rule='half': gradient 0.5 there (the reference's max/min code on PyTorch >= 1.10).
    Both give gradient 1 inside (0, 1) and 0 outside [0, 1].
    """
    if rule == "zero":
        return torch.clamp(z, 0.0, 1.0)
    if rule == "half":
        return torch.clamp(z, z.new_zeros(()), z.new_ones(()))
    raise ValueError(f"unknown clamp rule '{rule}': choose one of {', '.join(CLAMP_RULES)}")


def project(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Projects delta onto the box (0 <= x + delta <= 1), then onto the L-inf ball of radius eps."""
    delta = torch.clamp(x + delta, 0.0, 1.0) - x
    return torch.clamp(delta, -eps, eps)


def uniform_delta(x: torch.Tensor, eps: float) -> torch.Tensor:
    """U[-eps, eps]^d noise shaped like x (not box-projected), from the global torch RNG."""
    return torch.empty_like(x).uniform_(-eps, eps)


# ------------------------------------------------------------------------------------ input gradients
def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *,
               clamp_rule: str | None = None, create_graph: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient wrt delta of the summed cross-entropy at model(x + delta), and the logits.

    The forward sees clamp(x + delta) under `clamp_rule`, or x + delta when it is None.
    The summed loss gives each example the gradient of its own loss (the reference's batch mean
    divides it by B: same signs and cosines, no fp16 underflow). create_graph keeps the graph
    for double backprop (GradAlign); otherwise the result is detached.
    """
    delta = delta.detach().requires_grad_(True) if not create_graph else delta.requires_grad_(True)
    inputs = x + delta if clamp_rule is None else box_clamp(x + delta, clamp_rule)
    logits = model(inputs)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
    return (grad if create_graph else grad.detach()), logits.detach()


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
    normalisation, as in the reference); it is NaN if there is none. Differentiable wherever the
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
    """A scalar whose parameter gradient approximates that of sum_i <direction_i, grad_i>, where grad_i
    is example i's input gradient of the summed cross-entropy at x + delta (as input_grad computes it),
    without double backprop.

    Each direction_i (detached) is split into its norm n_i and unit vector u_i; the directional
    derivative <u_i, grad_i> is replaced by the central difference (l_i(x + delta + h u_i) -
    l_i(x + delta - h u_i)) / (2 h), with l_i the example's cross-entropy (the forward sees the points
    clamped under `clamp_rule`, or raw when None). Error O(h^2) where the loss is smooth; h in [0, 1]
    input units. Costs two forward+backward passes of the batch; the two forwards run in the model's
    current mode (train mode updates BatchNorm's running statistics twice).
    """
    v = direction.detach().flatten(1).float()
    norm = v.norm(dim=1)
    unit = (v / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(1)).view_as(delta).to(x.dtype)
    base = x + delta.detach()
    losses = []
    for sign in (1.0, -1.0):
        point = base + sign * h * unit
        logits = model(point if clamp_rule is None else box_clamp(point, clamp_rule))
        losses.append(F.cross_entropy(_at_least_fp32(logits), y, reduction="none"))
    return (norm * (losses[0] - losses[1])).sum() / (2 * h)


def grad_align_reg_fd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grad1: torch.Tensor,
                      grad2: torch.Tensor, delta2: torch.Tensor, lam: float, h: float, *,
                      delta1: torch.Tensor | None = None, clamp_rule1: str | None = None) -> torch.Tensor:
    """GradAlign's regulariser with a finite-difference parameter gradient instead of double backprop.

    Value: exactly grad_align_reg(grad1, grad2, lam) (the gradients are used detached). Parameter
    gradient: by the chain rule d reg / d theta = sum_j <d reg / d grad_j, d grad_j / d theta>; each
    term is the parameter gradient of <v_j, grad_j> with v_j = d reg / d grad_j held fixed, and
    directional_fd_surrogate approximates it with a central difference of step h (in [0, 1] input
    units) along v_j. grad2 is the input gradient at x + delta2 (no clamp), as train.py computes it;
    grad1 gets its term only when delta1 is given (grad1 at x + delta1 under clamp_rule1), otherwise it
    is treated as a constant, as the detached FGSM gradient is. Shapes (B, C, H, W).
    Cost: 2 forward+backward passes per differentiated gradient, no double backprop. For a smooth
    network the error of the gradient vanishes as h -> 0 (until rounding dominates). A ReLU network
    differs: double backprop treats its kinks as flat, while the difference sees every kink within h of
    a point, so the two agree only for h below the distance to the nearest kink (about 1e-5 and
    float64 on a small CNN); at the h that fp32 allows, this is a smoothed variant, not the same gradient.
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
    decay 0.99 and sensitivity 2. The running mean and std (Welford) are tensors on the error's
    device: update() makes no host synchronisation.
    """
    lam_max: float
    decay: float = 0.99
    sensitivity: float = 2.0
    count: int = 0
    lam: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, error: torch.Tensor) -> torch.Tensor:
        """Sets lambda from this step's error (a detached scalar), then adds the error to the
        statistics; returns the lambda for this step (a 0-dim tensor)."""
        error = error.detach().float()
        if self.lam is None:
            self.lam, self.mean, self.m2 = (torch.zeros_like(error) for _ in range(3))
        std = torch.sqrt(self.m2 / max(self.count, 1))
        spike = (error > self.mean + self.sensitivity * std) & (self.count > 2)
        self.lam = torch.where(spike, torch.full_like(error, self.lam_max), self.decay * self.lam)
        self.count += 1
        diff = error - self.mean
        self.mean = self.mean + diff / self.count
        self.m2 = self.m2 + diff * (error - self.mean)
        return self.lam

    def state_dict(self) -> dict:
        return {"count": self.count, "lam": self.lam, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.lam, self.mean, self.m2 = state["count"], state["lam"], state["mean"], state["m2"]


# --------------------------------------------------------------------------------------------- attacks
def fgsm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta0: torch.Tensor, eps: float,
                step: float, clamp_rule: str, *, create_graph: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FGSM step from delta0 (training: FGSM, FGSM-RS and Free-AT; SPEC §3.1 item 6).

    The gradient is taken at clamp(x + delta0) under `clamp_rule`; the step is step * sign(grad)
    (step = fgsm_alpha * eps), clipped to [-eps, eps] and projected onto the box.
    Returns (delta, grad at delta0); delta is detached, and so is grad unless create_graph keeps its
    graph (GradAlign backpropagating through this gradient too).
    """
    grad, _ = input_grad(model, x, y, delta0, clamp_rule=clamp_rule, create_graph=create_graph)
    delta = torch.clamp(delta0.detach() + step * torch.sign(grad.detach()), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad


def zero_smallest(grad: torch.Tensor, q: float) -> torch.Tensor:
    """ZeroGrad's filter: in each example of grad (B, ...), the floor(q * d) coordinates of smallest
    |value| (d coordinates per example; ties broken by position) are set to 0, the rest kept.

    q in [0, 1): 0 returns grad unchanged. Shapes and dtype are kept; no host synchronisation.
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"ZeroGrad's quantile must be in [0, 1) (got {q})")
    flat = grad.flatten(1)
    k = int(q * flat.shape[1])
    if k == 0:
        return grad
    smallest = flat.abs().topk(k, dim=1, largest=False, sorted=False).indices
    return flat.scatter(1, smallest, 0.0).view_as(grad)


def zerograd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta0: torch.Tensor, eps: float,
                    step: float, q: float, clamp_rule: str, *, create_graph: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroGrad (Golgooni et al., arXiv 2103.15476): FGSM whose small gradient coordinates do not move.

    Threat model: L-inf ball of radius eps (in [0, 1] units) intersected with the box [0, 1].
    The gradient g is taken at clamp(x + delta0) under `clamp_rule`, as in fgsm_attack; in each example
    the floor(q * d) coordinates with the smallest |g| are zeroed (zero_smallest), and the step is
    step * sign(filtered g) (a zeroed coordinate keeps its delta0 value), clipped to [-eps, eps] and
    projected onto the box. x, delta0: (B, C, H, W); q in [0, 1).
    Returns (delta, g at delta0 before filtering): |delta|_inf <= eps and 0 <= x + delta <= 1; delta
    is detached, g too unless create_graph.
    """
    grad, _ = input_grad(model, x, y, delta0, clamp_rule=clamp_rule, create_graph=create_graph)
    kept = zero_smallest(grad.detach(), q)
    delta = torch.clamp(delta0.detach() + step * torch.sign(kept), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad


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
        delta = project(x, delta.detach() + alpha * torch.sign(grad), eps)
    return delta


@dataclass
class RobustEval:
    """Outcome of robust_accuracy: fractions in [0, 1] and the attack's cost."""
    clean_acc: float
    pgd_acc: float
    n_eval: int
    grad_passes: int  # forward+backward passes, counted per example


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float,
                    alpha: float, n_iters: int, n_restarts: int, progress: Callable | None = None
                    ) -> RobustEval:
    """Clean and PGD-`n_iters`-`n_restarts` accuracy (the final evaluation, SPEC §3.1 item 12).

    An example counts as robust only if it is classified correctly clean and at every iterate
    (after the first step) and final point of every restart. That rule is at least as strong as
    the reference's (which keeps the max-loss restart), so it may stop early: an example already
    broken gets no more steps or restarts. Each restart draws its random start for the whole batch,
    so every example follows the same trajectory as in a plain full-batch PGD.
    The caller puts the model in eval mode and fp32.
    """
    n_clean = n_robust = n_total = passes = 0
    for x, y in batches:
        robust = _predict(model, x) == y
        n_clean += int(robust.sum())
        for _ in range(n_restarts):
            start = uniform_delta(x, eps) if n_iters > 0 else torch.zeros_like(x)  # as pgd_attack
            active = robust.nonzero().squeeze(1)
            if active.numel() == 0:
                continue
            xa, ya, delta = x[active], y[active], start[active]
            fooled = torch.zeros_like(ya, dtype=torch.bool)
            for step in range(n_iters):
                live = (~fooled).nonzero().squeeze(1)
                passes += live.numel()
                grad, logits = input_grad(model, xa[live], ya[live], delta[live])
                if step > 0:  # logits at a feasible point (the start is not box-projected)
                    fooled[live] |= logits.argmax(1) != ya[live]
                delta[live] = project(xa[live], delta[live] + alpha * torch.sign(grad), eps)
            fooled |= _predict(model, xa + delta) != ya
            robust[active[fooled]] = False
        n_robust += int(robust.sum())
        n_total += len(y)
        if progress is not None:
            progress(len(y))
    return RobustEval(n_clean / n_total, n_robust / n_total, n_total, passes)


def seeded_robust_accuracy(model: nn.Module, batches, eps: float, n_iters: int, n_restarts: int, seed: int,
                           progress: Callable | None = None) -> RobustEval:
    """robust_accuracy with step eps/4 from a freshly seeded RNG: train.py's final evaluation and
    eval.py give the same numbers for the same points, batch size, seed and device."""
    torch.manual_seed(seed)
    return robust_accuracy(model, batches, eps, eps / 4, n_iters, n_restarts, progress)


# ----------------------------------------------------------------------------- periodic evaluation
def _accuracy_and_deltas(model, batches, eps, alpha, n_iters, random_start):
    correct, n, deltas = 0, 0, []
    for x, y in batches:
        delta = pgd_attack(model, x, y, eps, alpha, n_iters, random_start=random_start)
        correct += int((_predict(model, x + delta) == y).sum())
        n += len(y)
        deltas.append(delta)
    return correct / max(n, 1), deltas


def _grads(model, batches, eps, clamp_rule, at_random_point):
    grads = []
    for x, y in batches:
        delta = uniform_delta(x, eps) if at_random_point else torch.zeros_like(x)
        grads.append(input_grad(model, x, y, delta, clamp_rule=clamp_rule)[0])
    return grads


def _mean_cos(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    cos = torch.cat([per_example_cos(a, b) for a, b in zip(first, second)])
    return float(cos.mean()) if cos.numel() else float("nan")


def periodic_metrics(model: nn.Module, test_batches, train_batches, eps: float, alpha: float,
                     attack_iters: int, clamp_rule: str) -> dict[str, float]:
    """The reference's periodic evaluation (SPEC §3.1 item 9), in its order of random draws.

    Test subset: clean, FGSM (one step of eps from zero) and PGD-`attack_iters` (step alpha, one
    random restart) accuracy, and cos_fgsm_pgd between their deltas; training subset: PGD accuracy
    (for early stopping); then cos_x_eta between input gradients at clamp(x) and clamp(x + eta).
    The caller sets eval mode (and the training precision).
    """
    test_clean, _ = _accuracy_and_deltas(model, test_batches, eps, alpha, 0, True)
    test_fgsm, fgsm_deltas = _accuracy_and_deltas(model, test_batches, eps, eps, 1, False)
    test_pgd, pgd_deltas = _accuracy_and_deltas(model, test_batches, eps, alpha, attack_iters, True)
    train_pgd, _ = _accuracy_and_deltas(model, train_batches, eps, alpha, attack_iters, True)
    grad_x = _grads(model, test_batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, test_batches, eps, clamp_rule, at_random_point=True)
    return {"test_clean_acc": test_clean, "test_fgsm_acc": test_fgsm, "test_pgd_acc": test_pgd,
            "train_pgd_acc": train_pgd, "cos_x_eta": _mean_cos(grad_x, grad_eta),
            "cos_fgsm_pgd": _mean_cos(fgsm_deltas, pgd_deltas)}


def cos_x_eta(model: nn.Module, batches, eps: float, clamp_rule: str) -> float:
    """Mean cosine between input gradients at clamp(x) and clamp(x + eta), eta ~ U[-eps, eps]^d."""
    grad_x = _grads(model, batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, batches, eps, clamp_rule, at_random_point=True)
    return _mean_cos(grad_x, grad_eta)


# --------------------------------------------------------------------------------- learning rate
def lr_at(t: float, schedule: str, lr_max: float, epochs: int) -> float:
    """Learning rate at fractional epoch t (t = epoch - 1 + (i + 1) / len(loader); SPEC §3.1 item 3).

    cyclic: linear 0 -> lr_max at floor(2E/5) epochs -> 0 at E (0 for t <= 0).
    piecewise: lr_max, then /10 from t/E >= 0.5 and /100 from t/E >= 0.75.
    """
    if schedule == "cyclic":
        return float(np.interp([t], [0, epochs * 2 // 5, epochs], [0, lr_max, 0])[0])
    if schedule == "piecewise":
        frac = t / epochs
        return lr_max if frac < 0.5 else lr_max / 10 if frac < 0.75 else lr_max / 100
    raise ValueError(f"unknown lr schedule '{schedule}'")


# ------------------------------------------------------------------------------------- precision
class Autocast(nn.Module):
    """Runs the wrapped model's forward under torch.autocast and returns fp32 logits.

    float16 on CUDA, bfloat16 on the CPU, so the CPU exercises the same mixed-precision path.
    Only forwards are autocast; backward passes (and double backprop) run outside it.
    """

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = torch.float16 if device_type == "cuda" else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def resolve_device(spec: str, gpu: int | None = None) -> torch.device:
    """'auto' -> cuda if available else cpu; --gpu N picks cuda:N. Raises ValueError without CUDA."""
    if spec == "auto":
        spec = f"cuda:{gpu or 0}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda" and gpu:
        spec = f"cuda:{gpu}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec} asked for CUDA, but this machine has none; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible; pick another --gpu")
    return device


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Moves the model; on CUDA also channels_last weights and cuDNN autotuning (speed only: the
    reference's cuDNN was not deterministic either)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------- file I/O
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes data to a temporary file beside path, then renames it over path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temporary file and a rename: a killed run never leaves a torn file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_jsonl(path: str) -> list[dict]:
    """The whole lines of a JSON-lines file (a torn last line is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def append_jsonl(path: str, obj: dict) -> None:
    """Appends one whole line in a single write call."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def truncate_jsonl(path: str, n_lines: int) -> None:
    """Keeps the first n_lines whole lines (drops lines written after a checkpoint and torn ones)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.endswith("\n")][:n_lines]
    atomic_write_bytes(path, "".join(lines).encode())


class RunLocked(Exception):
    """Another live process holds the run's lock."""


class RunLock:
    """An exclusive lock file (run_dir/.lock holding 'host pid'); a dead process's lock is taken over."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.held = False

    def acquire(self) -> None:
        """Takes the lock or raises RunLocked. The lock file is written in full beside it and then
        hard-linked into place, so a lock that exists always names its owner."""
        me = f"{socket.gethostname()} {os.getpid()}"
        mine = f"{self.path}.{os.getpid()}"
        with open(mine, "w") as f:
            f.write(me)
        try:
            for _ in range(2):
                try:
                    os.link(mine, self.path)  # atomic: fails if the lock exists
                except FileExistsError:
                    owner = self._owner()
                    if owner is not None and self._alive(*owner):
                        raise RunLocked(f"pid {owner[1]} on {owner[0]}") from None
                    self._remove_if_owned_by(owner)  # stale: its process is gone
                    continue
                self.held = True
                return
            raise RunLocked("another process took the lock at the same moment")
        finally:
            os.remove(mine)

    def _remove_if_owned_by(self, owner: tuple[str, int] | None) -> None:
        if self._owner() == owner:  # not replaced by a live process meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _owner(self) -> tuple[str, int] | None:
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    @staticmethod
    def _alive(host: str, pid: int) -> bool:
        if host != socket.gethostname():
            return True  # cannot check another machine's processes: assume it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
