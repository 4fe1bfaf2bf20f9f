"""The training methods, one registry entry each: the paper's (arXiv 2007.02617: FGSM, FGSM-RS,
GradAlign, Free-AT, PGD-K) and the later fast adversarial training methods (N-FGSM, ZeroGrad,
MultiGrad, ELLE, ELLE-A). train.py's step, report.py's labels, the sweeps in sh/ (through sweep.py)
and bench.py all read REGISTRY.

A method is its maths (an attack or a regulariser in utils.py) plus one Method: the train.py flags
that select it, its report label, its cost per step, its sweep recipes and the function train.py's
step calls. A perturbation (the attack a step trains on) and a regulariser (a term added to the loss)
combine: FGSM-RS + GradAlign is two entries. register() adds a checked entry from outside, and
load_file() runs a file of such calls (train.py --methods_file; docs/adding_a_method.md). Flags come
as --flag=value words; eps is in 1/255 units. An entry's flags (its defaults= and recipes) are train.py's,
which config.py declares above this module: config.py checks them (config.registry_problem).
Per dataset, a recipe's flags include the training schedule of the authors' sweeps (--epochs,
--lr_max); the digits demos set their own. A method of a later paper also carries that paper's
protocol (Protocol: the schedule's peak, precision, input normalisation, a last clean forward, the
network, the augmentation), which train.py applies with --protocol own. torch is imported only by the
functions that train, so report.py and sweep.py (which the shell scripts call once per sweep) start fast.
"""
from __future__ import annotations

import dataclasses
import dis
import hashlib
import inspect
import math
import os
import re
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------------------------- sweep settings
@dataclass(frozen=True)
class Schedule:
    """--epochs and --lr_max of a dataset's sweep: the default, GradAlign's and Free-AT's."""
    epochs: int
    lr_max: str
    gradalign_lr_max: str
    free_at_epochs: int
    free_at_lr_max: str


# The authors' sweep settings (Free-AT replays each batch 8 times, so it runs more epochs). The paper
# has no CIFAR-100 runs: cifar100 is the later methods' schedule (30 epochs at 0.2, as N-FGSM's and
# ZeroGrad's scripts), with CIFAR-10's GradAlign and Free-AT columns.
SCHEDULES = {"cifar10": Schedule(30, "0.2", "0.30", 96, "0.04"),
             "svhn": Schedule(15, "0.05", "0.05", 45, "0.01"),
             "cifar100": Schedule(30, "0.2", "0.30", 96, "0.04")}


@dataclass(frozen=True)
class Protocol:
    """How a paper trains, beyond its method's flags: where the cyclic learning rate peaks (a fraction
    of training: --lr_peak), whether it trains in half precision (this paper's sweeps do: --half_prec),
    the input normalisation inside the model (--normalize: models.NORMALIZATIONS), whether each step
    ends with a clean forward in train mode, which only updates BatchNorm's statistics (--clean_forward),
    the network (--model: models.MODELS) and the training augmentation (--augment: data.AUGMENTATIONS)."""
    lr_peak: float = 0.4
    half_prec: bool = True
    normalize: str = "none"
    clean_forward: bool = False
    model: str = "resnet18"
    augment: str = "dataset"

    def settings(self) -> dict[str, Any]:
        """The train.py settings it fills in when they are not given (precision is checked, not set)."""
        return {"lr_peak": self.lr_peak, "normalize": self.normalize, "clean_forward": self.clean_forward,
                "model": self.model, "augment": self.augment}


PAPER = Protocol()  # this paper's: the peak at 2/5, fp16 (the sweeps' --half_prec), no normalisation,
# the GradAlign authors' PreAct ResNet-18 and the dataset's crops and flips
# The later methods' own protocols, from their official code (docs/later_methods.md gives the lines):
# fp32 everywhere; on CIFAR the cyclic schedule peaks at mid-training, on SVHN at 2/5; N-FGSM's PreAct
# ResNet-18 (a final BatchNorm + ReLU) for N-FGSM, Rice et al.'s (also the shortcut of relu(bn1(x)))
# for ZeroGrad, MultiGrad and ELLE; ZeroGrad's code pads its CIFAR-10 crops by reflection, rotates its
# CIFAR-100 images and does not augment SVHN. A dataset its authors did not train on gets the CIFAR-10
# protocol without normalisation and with the dataset's augmentation (own_protocol).
NF, RICE = "resnet18_nfgsm", "resnet18_rice"
NFGSM_OWN = {"cifar10": Protocol(0.5, False, "cifar10", model=NF),
             "cifar100": Protocol(0.5, False, "cifar100", model=NF),
             "svhn": Protocol(0.4, False, "svhn", model=NF)}
ZEROGRAD_OWN = {"cifar10": Protocol(0.5, False, "cifar10", model=RICE, augment="reflect"),
                "cifar100": Protocol(0.5, False, "cifar100", model=RICE, augment="rotate"),
                "svhn": Protocol(0.4, False, "half", model=RICE, augment="none")}
ELLE_OWN = {"cifar10": Protocol(0.5, False, clean_forward=True, model=RICE),
            "cifar100": Protocol(0.5, False, clean_forward=True, model=RICE),
            "svhn": Protocol(0.4, False, clean_forward=True, model=RICE)}


def gradalign_lambda(dataset: str, eps: float) -> str:
    """GradAlign's lambda at eps as the authors' scripts write it (3 decimals).

    cifar10: 0.02 * 10^(eps/8) (0.200 at 8, 2.000 at 16), except 1.124 at eps 14, where the formula
    (1.12468) rounds to 1.125: the authors' script has 1.124, and the run names follow it.
    svhn: exp(eps * ln(1.6) / 8 + ln(2.5^2 / 4)) (2.500 at 8, 3.162 at 12).
    digits (the offline demo, not in the paper): 1 at every eps, the value sh/search_digits.sh chose.
    """
    if dataset == "digits":
        return "1"
    if dataset == "cifar10":
        return "1.124" if eps == 14 else f"{0.02 * 10 ** (eps / 8):.3f}"
    if dataset == "svhn":
        return f"{math.exp(eps * math.log(1.6) / 8 + math.log(2.5 ** 2 / 4)):.3f}"
    if dataset == "cifar100":
        raise ValueError(f"GradAlign has no published lambda for cifar100: give --grad_align_cos_lambda yourself "
                         f"(CIFAR-10's at eps {eps:g} is {gradalign_lambda('cifar10', eps)})")
    raise ValueError(f"no GradAlign lambda for dataset '{dataset}': choose cifar10, svhn or digits")


def elle_lambda(eps: float) -> str:
    """ELLE's lambda in its authors' CIFAR-10 scripts: 1000 up to eps 8, 5000 up to 20, 10000 above
    (their grid is the even eps 2..26; an eps in between takes the value of the step it falls in)."""
    return "1000" if eps <= 8 else "5000" if eps <= 20 else "10000"


def nfgsm_noise_mult(eps: float, dataset: str, model: str) -> str:
    """N-FGSM's k in its authors' scripts: 2, except 3 on SVHN at eps 12 and 4 for WideResNet-28-10 on
    CIFAR-10 at eps 16 (either wide network of models.py)."""
    if dataset == "svhn" and eps == 12:
        return "3"
    if dataset == "cifar10" and model.startswith("wrn") and eps == 16:
        return "4"
    return "2"


# ZeroGrad's q in its authors' commands per dataset (0.35 elsewhere, their CIFAR-10 value)
ZEROGRAD_Q = {"cifar100": "0.45", "svhn": "0.7"}


def _no_words(eps: float, dataset: str, model: str) -> list[str]:
    return []


def _default_schedule(s: Schedule) -> tuple[int, str]:
    return s.epochs, s.lr_max


@dataclass(frozen=True)
class Recipe:
    """A sweep's train.py flags for a method: fixed words, the words that depend on eps, the dataset
    and the model, then the dataset's schedule (which of its columns: `schedule`; `schedules`: a
    dataset's (epochs, lr_max) of the method's own scripts instead)."""
    words: tuple[str, ...]
    per_eps: Callable[[float, str, str], list[str]] = _no_words
    schedule: Callable[[Schedule], tuple[int, str]] = _default_schedule
    schedules: dict[str, tuple[int, str]] = field(default_factory=dict)
    paper: bool = False   # one of the paper's six methods (the SVHN sweep, CIFAR-10's default)
    listed: bool = True   # False: bench.py measures it, the sweeps do not offer it
    bench: bool = True    # False: bench.py leaves it out (its step costs what another recipe's does)

    def flags(self, eps: float, dataset: str, model: str = "resnet18") -> list[str]:
        words = [*self.words, *self.per_eps(eps, dataset, model)]
        schedule = SCHEDULES.get(dataset)
        if dataset in self.schedules:
            epochs, lr = self.schedules[dataset]
            words += [f"--epochs={epochs}", f"--lr_max={lr}"]
        elif schedule is not None:
            epochs, lr = self.schedule(schedule)
            words += [f"--epochs={epochs}", f"--lr_max={lr}"]
        return words


# --------------------------------------------------------------------------------------- the entry
@dataclass
class Perturbation:
    """What a perturbation function returns: the delta trained on, the input gradient the attack took
    at its start (None if it took none; GradAlign's first gradient), that start's delta and the clamp
    rule of its forward."""
    delta: Any
    attack_grad: Any = None
    start: Any = None
    start_clamp: str | None = None


@dataclass(frozen=True)
class Method:
    """One training method. Exactly one of perturb and regularise is set.

    Selection: a perturbation with attack=A is selected by --attack A when `when(cfg)` also holds; a
    regulariser by `when(cfg)`; the first match in REGISTRY's order wins, and --method NAME selects
    an entry outright (the only way to select one with neither attack nor when).
    perturb(model, x, y, cfg, st) -> Perturbation; regularise(model, x, y, cfg, st, grad1, pert) ->
    a 0-dim tensor added to the loss. st is train.py's StepState (warm-up factor, iteration, whether
    the attack's gradient keeps its graph, and st.states[state_key], this method's state).
    label: the report's name; a perturbation's is a string or label(cfg), a regulariser's is
    label(cfg, perturbation's label). passes: forward+backward passes of one step (attack /
    monitoring pass at x / training pass; f: a forward only, dbl: a double backprop); a
    perturbation's is a string or passes(cfg), a regulariser's maps the perturbation's to the sum.
    """
    name: str
    label: str | Callable[..., str]
    passes: str | Callable[[Any], str] | dict[str, str] = "?"
    attack: str | None = None
    when: Callable[[Any], bool] | None = None
    perturb: Callable[..., Perturbation] | None = None
    regularise: Callable[..., Any] | None = None
    # a regulariser that uses the attack's input gradient at its start (grad1): whether it must keep its graph
    start_grad: Callable[[Any], bool] | None = None
    active: Callable[[Any, int], bool] | None = None  # on which iterations a regulariser applies (default: all)
    state: Callable[[Any], Any] | None = None  # the method's state across steps (a tensor or a state_dict owner)
    state_key: str | None = None               # ... and its key in resume.pt
    defaults: dict[str, Any] = field(default_factory=dict)  # defaults of flags for this --attack
    recipes: dict[str, Recipe] = field(default_factory=dict)
    own: dict[str, Protocol] | None = None  # its paper's protocol per dataset; None: this paper's (PAPER)

    def selects(self, cfg) -> bool:
        if self.attack is None and self.when is None:
            return False
        return (self.attack is None or cfg.attack == self.attack) and (self.when is None or self.when(cfg))

    def passes_for(self, cfg, base: str = "") -> str:
        if isinstance(self.passes, dict):
            return self.passes.get(base, "?")
        return self.passes(cfg) if callable(self.passes) else self.passes


# ---------------------------------------------------------------------------- the perturbations
def perturb_fgsm(model, x, y, cfg, st) -> Perturbation:
    """FGSM (zero start) or FGSM-RS (uniform start): one step of fgsm_alpha * eps from the start;
    SVHN warms the step multiplier only."""
    import torch

    import utils
    eps = cfg.eps_frac
    delta0 = torch.zeros_like(x) if cfg.attack_init == "zero" else utils.uniform_delta(x, eps)
    clamp = fgsm_clamp_rule(cfg)
    delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, st.warm * cfg.fgsm_alpha * eps, clamp,
                                    create_graph=st.grad1_graph)
    return Perturbation(delta, grad, delta0, clamp)


def fgsm_clamp_rule(cfg) -> str | None:
    """The box-clamp gradient rule of the FGSM step's forward: --clamp_grad (the paper's attacks clamp
    x + delta in the graph), or None under ELLE, whose authors take the gradient at x + delta with no
    clamp in the graph, so pixels at exactly 0 or 1 get their real gradient."""
    return None if cfg.elle_lambda > 0 else cfg.clamp_grad


def perturb_free_at(model, x, y, cfg, st) -> Perturbation:
    """Free-AT: FGSM from the delta of the previous step (zero at first), kept across batches; the
    loop replays each batch minibatch_replay times."""
    import torch

    import utils
    eps = cfg.eps_frac
    delta0 = st.states["free_delta"]
    if delta0 is None:
        delta0 = torch.zeros_like(x)
    delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, st.warm * cfg.fgsm_alpha * eps, cfg.clamp_grad,
                                    create_graph=st.grad1_graph)
    st.states["free_delta"] = delta
    return Perturbation(delta, grad, delta0, cfg.clamp_grad)


def perturb_zerograd(model, x, y, cfg, st) -> Perturbation:
    """ZeroGrad: FGSM(-RS) whose gradient coordinates below each example's --zerograd_q quantile of
    |gradient| do not move."""
    import torch

    import utils
    eps = cfg.eps_frac
    delta0 = torch.zeros_like(x) if cfg.attack_init == "zero" else utils.uniform_delta(x, eps)
    # as its authors' code: the start is projected onto the box first and the gradient taken there,
    # with no clamp in the graph (so --clamp_grad does not apply)
    delta, grad, start = utils.zerograd_attack(model, x, y, delta0, eps, st.warm * cfg.fgsm_alpha * eps,
                                               cfg.zerograd_q, create_graph=st.grad1_graph)
    return Perturbation(delta, grad, start, None)


def perturb_multigrad(model, x, y, cfg, st) -> Perturbation:
    """MultiGrad: --multigrad_samples input gradients at uniform starts vote on the sign of each
    coordinate; one step of fgsm_alpha * eps (clipped to eps) from zero where enough agree."""
    import utils
    eps = cfg.eps_frac
    agree = cfg.multigrad_samples if cfg.multigrad_agree == -1 else cfg.multigrad_agree
    delta, grad, start = utils.multigrad_attack(model, x, y, eps, st.warm * cfg.fgsm_alpha * eps,
                                                cfg.multigrad_samples, agree, create_graph=st.grad1_graph)
    return Perturbation(delta, grad, start, None)


def perturb_nfgsm(model, x, y, cfg, st) -> Perturbation:
    """N-FGSM: noise of k eps, one step of fgsm_alpha * eps, box-clamped only (outside the eps-ball);
    SVHN warms eps."""
    import utils
    eps = st.warm * cfg.eps_frac
    delta, grad, eta = utils.nfgsm_attack(model, x, y, eps, cfg.nfgsm_noise_mult, cfg.fgsm_alpha * eps,
                                          create_graph=st.grad1_graph)
    return Perturbation(delta, grad, eta, None)


def perturb_pgd(model, x, y, cfg, st) -> Perturbation:
    """PGD-K training; SVHN warms eps of the start and the projection, not the step."""
    import utils
    return Perturbation(utils.pgd_attack(model, x, y, st.warm * cfg.eps_frac, cfg.pgd_alpha_train_frac,
                                         cfg.pgd_train_n_iters, random_start=cfg.attack_init == "random",
                                         clamp_rule=cfg.clamp_grad))


def perturb_pgd_corner(model, x, y, cfg, st) -> Perturbation:
    """PGD, then moved to the full-eps corner of its signs and box-clamped."""
    import torch
    delta = cfg.eps_frac * torch.sign(perturb_pgd(model, x, y, cfg, st).delta)
    return Perturbation(torch.clamp(x + delta, 0.0, 1.0) - x)


def perturb_random_corner(model, x, y, cfg, st) -> Perturbation:
    """A random corner of the eps-ball, NOT box-clamped (as in the authors' code)."""
    import torch

    import utils
    return Perturbation(cfg.eps_frac * torch.sign(utils.uniform_delta(x, cfg.eps_frac)))


def perturb_none(model, x, y, cfg, st) -> Perturbation:
    import torch
    return Perturbation(torch.zeros_like(x))


# ------------------------------------------------------------------------------- the regularisers
def grad1_graph(cfg) -> bool:
    """Whether GradAlign backprops through its first gradient: --grad_align_grad1, where auto is
    detached for fgsm and nfgsm (the attack's own gradient is reused) and graph for the other attacks."""
    if cfg.grad_align_grad1 == "auto":
        return cfg.attack not in ("fgsm", "nfgsm")
    return cfg.grad_align_grad1 == "graph"


def regularise_gradalign(model, x, y, cfg, st, grad1, pert):
    """GradAlign: lambda * (1 - cos(grad1, grad2)), grad2 at x + eta, eta ~ U[-eps, eps]^d, with its
    graph: the parameter gradient is a double backprop."""
    import utils
    eta = utils.uniform_delta(x, cfg.eps_frac)
    grad2, _ = utils.input_grad(model, x, y, eta, create_graph=True)
    return utils.grad_align_reg(grad1, grad2, cfg.grad_align_cos_lambda)


def regularise_gradalign_fd(model, x, y, cfg, st, grad1, pert):
    """GradAlign's value, with the parameter gradient by finite differences of step --grad_align_fd."""
    import utils
    eta = utils.uniform_delta(x, cfg.eps_frac)
    grad2, _ = utils.input_grad(model, x, y, eta)
    return utils.grad_align_reg_fd(model, x, y, grad1, grad2, eta, cfg.grad_align_cos_lambda, cfg.grad_align_fd,
                                   delta1=pert.start if grad1_graph(cfg) else None, clamp_rule1=pert.start_clamp)


def regularise_elle(model, x, y, cfg, st, grad1, pert):
    """ELLE: --elle_lambda times the local-linearity error in the (warmed) eps-ball."""
    import utils
    return cfg.elle_lambda * utils.elle_error(model, x, y, st.warm * cfg.eps_frac)


def regularise_elle_adaptive(model, x, y, cfg, st, grad1, pert):
    """ELLE-A: the error times a lambda that jumps to --elle_lambda when the error spikes (utils.ElleAdaptive)."""
    import utils
    error = utils.elle_error(model, x, y, st.warm * cfg.eps_frac)
    rule = st.states["elle"]
    # the statistics start at the first training step: epoch 0's iteration (no update) does not feed them
    return (rule.update(error) if st.update else rule.current(error)) * error


def _new_elle_adaptive(cfg):
    import utils
    return utils.ElleAdaptive(lam_max=cfg.elle_lambda)


def _gradalign_label(cfg, base: str) -> str:
    """'<base> + GradAlign', then ' (...)' naming its non-default variant settings."""
    parts = []
    if cfg.grad_align_grad1 != "auto":
        parts.append(f"grad1 {cfg.grad_align_grad1}")
    if cfg.grad_align_every > 1:
        parts.append(f"every {cfg.grad_align_every}")
    if cfg.grad_align_fd > 0:
        parts.append("FD")
    return f"{base} + GradAlign" + (f" ({', '.join(parts)})" if parts else "")


def _one_fgsm_step(cfg) -> bool:
    """Plain FGSM(-RS): no batch replay, no gradient filter, no vote."""
    return cfg.minibatch_replay == 1 and cfg.zerograd_q == 0 and cfg.multigrad_samples == 0


def _pgd_label(suffix: str) -> Callable[[Any], str]:
    return lambda c: f"PGD-{c.pgd_train_n_iters}{'' if c.attack_init == 'zero' else '-RS'}{suffix}"


def _pgd_passes(cfg) -> str:
    return f"{cfg.pgd_train_n_iters}+f+1"


def _gradalign_every(cfg, iteration: int) -> bool:
    return iteration % cfg.grad_align_every == 0


def _gradalign_lambda_words(eps: float, dataset: str, model: str) -> list[str]:
    return [f"--grad_align_cos_lambda={gradalign_lambda(dataset, eps)}"]


def _gradalign_schedule(s: Schedule) -> tuple[int, str]:
    return s.epochs, s.gradalign_lr_max


FGSM_ZERO = ("--attack=fgsm", "--attack_init=zero")

# --------------------------------------------------------------------------------------- registry
# In the order of the sweeps' method lists (`sweep.py list`); selection takes the first match.
# Later methods carry their papers' settings per dataset (and model) and their papers' protocols
# (own=); their recipes keep this paper's schedule (their papers also train 30 epochs at lr_max 0.2 on
# CIFAR), except where their scripts set another (ZeroGrad and MultiGrad on SVHN; N-FGSM on SVHN, whose
# code trains its default 30 epochs there). docs/later_methods.md.
_ENTRIES = [
    Method("fgsm", "FGSM", "2", attack="fgsm", when=lambda c: c.attack_init == "zero" and _one_fgsm_step(c),
           perturb=perturb_fgsm, recipes={"fgsm": Recipe(FGSM_ZERO, paper=True)}),
    Method("fgsm_rs", "FGSM-RS", "2", attack="fgsm", when=lambda c: c.attack_init == "random" and _one_fgsm_step(c),
           perturb=perturb_fgsm,  # fgsm_alpha stays 1.25
           recipes={"fgsm_rs": Recipe(("--attack=fgsm", "--attack_init=random"), paper=True)}),
    Method("gradalign", _gradalign_label, {"2": "3+dbl"},
           when=lambda c: c.grad_align_cos_lambda > 0 and c.grad_align_fd == 0,
           regularise=regularise_gradalign, start_grad=grad1_graph, active=_gradalign_every,
           recipes={"gradalign": Recipe(FGSM_ZERO, _gradalign_lambda_words, _gradalign_schedule, paper=True)}),
    Method("pgd", _pgd_label(""), _pgd_passes, attack="pgd", perturb=perturb_pgd, recipes={
        f"pgd{k}": Recipe(("--attack=pgd", "--attack_init=zero", f"--pgd_train_n_iters={k}"),
                          lambda eps, dataset, model, k=k: [f"--pgd_alpha_train={eps / (2 if k == 2 else 5):g}"],
                          paper=True)  # alpha = eps/2 for PGD-2, eps/5 for PGD-10
        for k in (2, 10)}),
    Method("free_at", lambda c: f"Free-AT (m={c.minibatch_replay})", "2", attack="fgsm",
           when=lambda c: c.minibatch_replay > 1, perturb=perturb_free_at,  # ignores --attack_init
           state=lambda c: None, state_key="free_delta",
           recipes={"free_at": Recipe(("--attack=fgsm", "--attack_init=zero", "--fgsm_alpha=1.0",
                                       "--minibatch_replay=8"),
                                      schedule=lambda s: (s.free_at_epochs, s.free_at_lr_max), paper=True)}),
    # N-FGSM: noise k eps (nfgsm_noise_mult), step eps, at every eps
    Method("nfgsm", lambda c: "N-FGSM" if (c.nfgsm_noise_mult, c.fgsm_alpha) == (2.0, 1.0)
           else f"N-FGSM (k={c.nfgsm_noise_mult:g}, alpha={c.fgsm_alpha:g})", "2", attack="nfgsm",
           perturb=perturb_nfgsm, defaults={"fgsm_alpha": 1.0}, own=NFGSM_OWN,
           recipes={"nfgsm": Recipe(("--attack=nfgsm", "--fgsm_alpha=1.0"), lambda eps, dataset, model: [
               f"--nfgsm_noise_mult={nfgsm_noise_mult(eps, dataset, model)}"],
               schedules={"svhn": (30, "0.05")})}),  # its code's default epochs on SVHN (docs/later_methods.md)
    Method("zerograd", "ZeroGrad", "2", attack="fgsm", when=lambda c: c.zerograd_q > 0, perturb=perturb_zerograd,
           own=ZEROGRAD_OWN,
           recipes={"zerograd": Recipe(("--attack=fgsm", "--attack_init=random", "--fgsm_alpha=2.0"),
                                       lambda eps, dataset, model: [f"--zerograd_q={ZEROGRAD_Q.get(dataset, '0.35')}"],
                                       schedules={"svhn": (15, "0.01")})}),
    # MultiGrad (ZeroGrad's paper): 3 random starts vote, step 2 eps clipped to eps; SVHN as ZeroGrad's
    Method("multigrad", "MultiGrad", lambda c: f"{c.multigrad_samples}+1", attack="fgsm",
           when=lambda c: c.multigrad_samples > 0, perturb=perturb_multigrad, own=ZEROGRAD_OWN,
           recipes={"multigrad": Recipe(("--attack=fgsm", "--attack_init=random", "--fgsm_alpha=2.0",
                                         "--multigrad_samples=3"), schedules={"svhn": (15, "0.01")})}),
    Method("elle", lambda c, base: "ELLE" if base == "FGSM" else f"{base} + ELLE", {"2": "2+3"},
           when=lambda c: c.elle_lambda > 0 and not c.elle_adaptive, regularise=regularise_elle, own=ELLE_OWN,
           recipes={"elle": Recipe((*FGSM_ZERO, "--fgsm_alpha=1.0"),
                                   lambda eps, dataset, model: [f"--elle_lambda={elle_lambda(eps)}"],
                                   bench=False)}),  # its step costs what ELLE-A's does
    Method("elle_a", lambda c, base: "ELLE-A" if base == "FGSM" else f"{base} + ELLE-A", {"2": "2+3"},
           when=lambda c: c.elle_lambda > 0 and c.elle_adaptive, regularise=regularise_elle_adaptive,
           state=_new_elle_adaptive, state_key="elle", own=ELLE_OWN,
           recipes={"elle_a": Recipe((*FGSM_ZERO, "--fgsm_alpha=1.0", "--elle_lambda=4000", "--elle_adaptive"))}),
    # GradAlign with a finite-difference gradient instead of double backprop (h = 0.001), for bench.py
    Method("gradalign_fd", _gradalign_label, {"2": "3+2"},
           when=lambda c: c.grad_align_cos_lambda > 0 and c.grad_align_fd > 0,
           regularise=regularise_gradalign_fd, start_grad=lambda c: False, active=_gradalign_every,
           recipes={"gradalign_fd": Recipe(FGSM_ZERO, lambda eps, dataset, model: [
               *_gradalign_lambda_words(eps, dataset, model), "--grad_align_fd=0.001"],
                                           _gradalign_schedule, listed=False)}),
    Method("pgd_corner", _pgd_label(" corner"), _pgd_passes, attack="pgd_corner", perturb=perturb_pgd_corner),
    Method("random_corner", "Random corner", "f+1", attack="random_corner", perturb=perturb_random_corner),
    Method("none", "Standard", "f+1", attack="none", perturb=perturb_none),
]
REGISTRY: dict[str, Method] = {m.name: m for m in _ENTRIES}
# train.py's --attack values: the attack= of the built-in perturbations
ATTACKS = tuple(dict.fromkeys(m.attack for m in _ENTRIES if m.attack is not None))

# Row order of report.py's tables: the paper's methods, plain training first, and FGSM-RS + GradAlign;
# then the later methods. Labels not here follow alphabetically.
ROW_ORDER = ["Standard", "FGSM", "FGSM-RS", "FGSM + GradAlign", "FGSM-RS + GradAlign", "Free-AT (m=8)",
             "PGD-2", "PGD-10", "N-FGSM", "ZeroGrad", "MultiGrad", "ELLE", "ELLE-A", "FGSM + GradAlign (FD)"]


# ------------------------------------------------------------------------------ registering a method
NAME = re.compile(r"[a-z][a-z0-9_]*")  # a method's or recipe's name: it ends run names, it is a sweep word
PASSES = re.compile(r"(\d+|f|dbl)(\+(\d+|f|dbl))*")  # '2', '3+dbl', '10+f+1' (Method's docstring)
# How train.py's step calls a method's functions (argument names as the built-in entries write them).
CALLS = {"perturb": ("model", "x", "y", "cfg", "st"), "regularise": ("model", "x", "y", "cfg", "st", "grad1", "pert"),
         "when": ("cfg",), "start_grad": ("cfg",), "active": ("cfg", "iteration"), "state": ("cfg",)}
BUILT_IN = frozenset(REGISTRY)
_ROWS: dict[str, list[str]] = {}  # the rows of ROW_ORDER that register() added, by method name


def register(method: Method, *, rows: list[str] | None = None, replace: bool = False) -> Method:
    """Adds a method to REGISTRY (after the others: flags that select an earlier entry keep selecting
    it) and its rows to ROW_ORDER, after checking it. rows: the labels its runs get in report.py's
    tables, in order (default: the label, when it is a string; a label computed by a function needs
    them). replace=True replaces a method registered earlier under the same name (not a built-in;
    the new entry goes last).
    Raises TypeError or ValueError, one line naming what is wrong, and then registers nothing. Its
    defaults= and recipes are train.py flags: config.py checks those when a command next reads the
    registry (config.registry_problem: train.py's parse, a loaded methods file, sweep.py)."""
    rows = _checked_rows(method, rows, replace)
    if replace and method.name in REGISTRY:
        unregister(method.name)
    REGISTRY[method.name] = method
    ROW_ORDER.extend(rows)
    _ROWS[method.name] = rows
    return method


def added_rows(name: str) -> list[str] | None:
    """The rows of ROW_ORDER that register() added for a method, or None for one it did not add."""
    rows = _ROWS.get(name)
    return None if rows is None else list(rows)


def snapshot() -> tuple:
    """The registry's state (REGISTRY, ROW_ORDER, what register() and load_file() added), for restore()."""
    return dict(REGISTRY), list(ROW_ORDER), {k: list(v) for k, v in _ROWS.items()}, dict(_FILES)


def restore(state: tuple) -> None:
    """Puts the registry back as snapshot() found it (a failed registration or file, a test)."""
    registry, rows, added, files = state
    REGISTRY.clear()
    REGISTRY.update(registry)
    ROW_ORDER[:] = rows
    _ROWS.clear()
    _ROWS.update(added)
    _FILES.clear()
    _FILES.update(files)


def unregister(name: str) -> None:
    """Removes a method registered by register(), and its rows."""
    REGISTRY.pop(name)
    for row in _ROWS.pop(name, []):
        ROW_ORDER.remove(row)


def _checked_rows(m: Method, rows: list[str] | None, replace: bool) -> list[str]:
    """The rows of ROW_ORDER the entry adds, once every check of register() passes."""
    if not isinstance(m, Method):
        raise TypeError(f"register() takes a methods.Method, not {type(m).__name__}")
    if not isinstance(m.name, str) or not NAME.fullmatch(m.name):
        raise ValueError(f"method name {m.name!r}: use lowercase letters, digits and _, starting with a letter "
                         "(it ends run names and is a word of the sweeps' METHODS)")
    if m.name in BUILT_IN:
        raise ValueError(f"'{m.name}' is a built-in method and cannot be replaced; register yours under another name")
    if m.name in REGISTRY and not replace:
        raise ValueError(f"a method named '{m.name}' is already registered; choose another name, or pass "
                         "replace=True to replace your own")
    what = f"method '{m.name}'"
    if (m.perturb is None) == (m.regularise is None):
        raise ValueError(f"{what}: give exactly one of perturb= and regularise=")
    role = "perturb" if m.perturb is not None else "regularise"
    for key, args in CALLS.items():
        _check_call(what, key, getattr(m, key), args)
    if role == "perturb" and (m.start_grad is not None or m.active is not None):
        raise ValueError(f"{what}: start_grad= and active= are a regulariser's; a perturbation has neither")
    if role == "regularise" and m.start_grad is None and _reads_argument(m.regularise, 5):
        raise ValueError(f"{what}: regularise reads grad1 (the input gradient at the attack's start) but the "
                         "entry has no start_grad=: under an attack that takes no gradient there (PGD) grad1 "
                         "would be None; give start_grad=lambda cfg: False (or True: grad1 keeps its graph)")
    # the report's name of its runs: a perturbation's label(cfg), a regulariser's label(cfg, base)
    if role == "regularise" and not callable(m.label):
        raise TypeError(f"{what}: a regulariser's label is a function of (cfg, base), base being the "
                        f"perturbation's label, e.g. label=lambda cfg, base: f\"{{base}} + {m.label}\"")
    if callable(m.label):
        _check_call(what, "label", m.label, ("cfg",) if role == "perturb" else ("cfg", "base"))
    elif not isinstance(m.label, str):
        raise TypeError(f"{what}: label must be a string or a function, not {type(m.label).__name__}")
    _check_passes(what, m.passes, role)
    if m.attack is not None and m.attack not in ATTACKS:
        raise ValueError(f"{what}: attack={m.attack!r} is not a train.py --attack ({', '.join(ATTACKS)}); "
                         "leave attack=None and select the method with --method NAME")
    if (m.state is None) != (m.state_key is None):
        raise ValueError(f"{what}: give state= and state_key= together (the state and its key in resume.pt)")
    keys = {other.state_key for name, other in REGISTRY.items() if name != m.name}
    if m.state_key is not None and m.state_key in keys:
        raise ValueError(f"{what}: state_key '{m.state_key}' is another method's; choose another")
    if not isinstance(m.defaults, dict) or not all(isinstance(k, str) for k in m.defaults):
        raise TypeError(f"{what}: defaults= maps train.py flag names to values, e.g. {{\"fgsm_alpha\": 1.0}}")
    taken = {key for name, other in REGISTRY.items() if name != m.name for key in other.recipes}
    for key, recipe in m.recipes.items():
        if not isinstance(recipe, Recipe):
            raise TypeError(f"{what}: recipe '{key}' must be a methods.Recipe, not {type(recipe).__name__}")
        if not isinstance(key, str) or not NAME.fullmatch(key):
            raise ValueError(f"{what}: recipe name {key!r}: use lowercase letters, digits and _")
        if key in taken:
            raise ValueError(f"{what}: recipe name '{key}' is taken by another method; choose another")
    # its rows in report.py's tables
    if rows is None:
        if callable(m.label):
            raise ValueError(f"{what}: its label is computed, so give register(..., rows=[...]) the labels its "
                             "runs get, in the order of report.py's rows (methods.ROW_ORDER)")
        rows = [m.label]
    if isinstance(rows, str) or not all(isinstance(r, str) for r in rows) or not rows:
        raise TypeError(f"{what}: rows= is a list of labels (strings), e.g. rows=[\"FGSM + X\", \"FGSM-RS + X\"]")
    own = set(_ROWS.get(m.name, [])) if replace else set()
    for row in rows:
        if not row.strip() or "|" in row or "\n" in row:
            raise ValueError(f"{what}: label {row!r} must be a non-empty line without '|' (a cell of report.py's "
                             "tables)")
        if row in ROW_ORDER and row not in own:
            raise ValueError(f"{what}: the label '{row}' is another method's: report.py would put both in one "
                             "row; choose another label")
    if len(set(rows)) != len(rows):
        raise ValueError(f"{what}: rows= names a label twice")
    return list(rows)


def _check_call(what: str, key: str, fn, args: tuple[str, ...]) -> None:
    """TypeError unless fn is None or can be called with these arguments, as train.py calls it."""
    if fn is None:
        return
    if not callable(fn):
        raise TypeError(f"{what}: {key}= must be a function of ({', '.join(args)}), not {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it is called as it is
    try:
        signature.bind(*args)
    except TypeError:
        name = getattr(fn, "__name__", key)
        raise TypeError(f"{what}: {key}= is called as {key}({', '.join(args)}); {name}{signature} cannot be"
                        ) from None


def _check_passes(what: str, passes, role: str) -> None:
    """passes: a string like '2' or '10+f+1', or passes(cfg); a regulariser's may map the perturbation's
    passes to the sum ({'2': '3+dbl'})."""
    example = "passes=\"2\"" if role == "perturb" else "passes={\"2\": \"3+dbl\"}"
    if callable(passes):
        _check_call(what, "passes", passes, ("cfg",))
        return
    values = list(passes.values()) if isinstance(passes, dict) and role == "regularise" else [passes]
    if isinstance(passes, dict) and not all(isinstance(k, str) for k in passes):
        values = [None]
    if not values or not all(isinstance(v, str) and PASSES.fullmatch(v) for v in values):
        raise ValueError(f"{what}: passes={passes!r}: give its forward+backward passes per step, {example} (terms "
                         "joined by +: a number of passes, f a forward only, dbl a double backprop)")


def _reads_argument(fn, index: int) -> bool:
    """Whether fn's body reads its index-th positional argument; False when that cannot be told (not a
    plain Python function)."""
    fn = inspect.unwrap(fn)
    if inspect.ismethod(fn):  # its first argument is bound
        fn, index = fn.__func__, index + 1
    code = getattr(fn, "__code__", None)
    if code is None or index >= code.co_argcount:
        return False
    name = code.co_varnames[index]
    if name in code.co_cellvars:  # an inner function uses it
        return True
    for instruction in dis.get_instructions(code):
        if instruction.opname.startswith("LOAD_FAST"):
            names = instruction.argval if isinstance(instruction.argval, tuple) else (instruction.argval,)
            if name in names:
                return True
    return False


# ------------------------------------------------------------------------------- a methods file
FILE_HASH = "methods_file_sha256"  # config.json's key for the content hash of a run's --methods_file
_FILES: dict[str, tuple[str, tuple[str, ...]]] = {}  # the loaded files: path -> (sha256, names registered)


def load_file(path: str) -> str:
    """Runs a Python file that registers methods (train.py --methods_file) and returns the sha256 of its
    content. A file loaded before with the same content is not run again; one whose content changed
    replaces the methods it registered. Raises ValueError, one line naming the file and what is wrong,
    and then registers nothing."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise ValueError(f"methods file {path}: {exc.strerror}; give the file that registers the methods") from None
    digest = hashlib.sha256(source).hexdigest()
    if _FILES.get(path, ("",))[0] == digest:
        return digest
    before = snapshot()
    unload_file(path)
    module_name = f"methods_file_{digest[:16]}"
    module = types.ModuleType(module_name)
    module.__file__ = path
    sys.modules[module_name] = module  # dataclasses and pickle look a module up by name
    try:
        exec(compile(source, path, "exec"), module.__dict__)  # the content hashed, as it was read
        names = tuple(name for name in REGISTRY if before[0].get(name) is not REGISTRY[name])
        if not names:
            raise ValueError("it registers no method: call methods.register(methods.Method(...)) in it")
    except Exception as exc:
        sys.modules.pop(module_name, None)
        restore(before)
        raise ValueError(f"methods file {path}{_where(exc, path)}: {_one_line(exc)}") from None
    _FILES[path] = (digest, names)
    return digest


def unload_file(path: str) -> None:
    """Unregisters the methods a loaded file registered (nothing if it was not loaded)."""
    _, names = _FILES.pop(os.path.abspath(path), ("", ()))
    for name in names:
        if name in REGISTRY:
            unregister(name)


def loaded_hash(path: str) -> str | None:
    """The sha256 of the content of path that load_file() ran, or None if it has not loaded it."""
    return _FILES.get(os.path.abspath(path), (None,))[0]


def changed_since(settings: dict, path: str | None) -> str | None:
    """How the methods file loaded now (path; None: none given) differs from the one a run's config.json
    records (its sha256), in one line; None when it is the same or the run recorded none."""
    recorded = settings.get(FILE_HASH)
    now = loaded_hash(path) if path else None
    if recorded is None or now == recorded:
        return None
    return (f"methods file {settings.get('methods_file')} has changed since a run recorded it (sha256 "
            f"{str(recorded)[:12]}, now " + (f"{now[:12]}" if now else "none given") + ")")


def unavailable(cfg) -> str | None:
    """Why cfg's method cannot be named (its --method is not registered: the file that registers it was
    not loaded), or None."""
    method = getattr(cfg, "method", None)
    if method is None or method in REGISTRY:
        return None
    where = getattr(cfg, "methods_file", None)
    return (f"its method '{method}' is not registered" + (f" (config.json names the file {where})" if where else "")
            + "; give the file that registers it with --methods_file")


def _where(exc: BaseException, path: str) -> str:
    """' line N' of the file where exc was raised, or ''."""
    if isinstance(exc, SyntaxError) and exc.filename == path and exc.lineno:
        return f" line {exc.lineno}"
    lines = [line for frame, line in traceback.walk_tb(exc.__traceback__) if frame.f_code.co_filename == path]
    return f" line {lines[-1]}" if lines else ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, ValueError | TypeError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -------------------------------------------------------------------------------------- selection
def select(cfg) -> tuple[Method | None, Method | None]:
    """(the perturbation, the regulariser or None) that cfg selects; cfg.method replaces the one of its
    role. The perturbation is None only for an --attack no entry handles (an older run's config).
    Raises ValueError (unavailable()) for a cfg.method that is not registered."""
    perturbation = next((m for m in REGISTRY.values() if m.perturb is not None and m.selects(cfg)), None)
    regulariser = next((m for m in REGISTRY.values() if m.regularise is not None and m.selects(cfg)), None)
    problem = unavailable(cfg)
    if problem:  # not the flags' methods in its place: a run is never named after another method
        raise ValueError(problem)
    chosen = REGISTRY.get(getattr(cfg, "method", None) or "")
    if chosen is not None and chosen.perturb is not None:
        perturbation = chosen
    elif chosen is not None:
        regulariser = chosen
    return perturbation, regulariser


def method_problem(cfg) -> str | None:
    """Why cfg.method cannot be used with these flags, or None: a method that has flags of its own
    (attack=, when=) must also be what they select."""
    if cfg.method is None:
        return None
    chosen = REGISTRY.get(cfg.method)
    if chosen is None:
        return f"--method {cfg.method} is not registered"
    if (chosen.attack is not None or chosen.when is not None) and not chosen.selects(cfg):
        words = next(iter(chosen.recipes.values())).words if chosen.recipes else ()
        return f"--method {cfg.method} does not match the other flags; its flags are: {' '.join(words) or '?'}"
    return None


def label_of(cfg) -> str:
    """The report's name of cfg's training method (the paper's name for the paper's methods)."""
    perturbation, regulariser = select(cfg)
    base = cfg.attack if perturbation is None else (
        perturbation.label(cfg) if callable(perturbation.label) else perturbation.label)
    return base if regulariser is None else regulariser.label(cfg, base)


def own_protocol(cfg, dataset: str) -> Protocol | None:
    """The protocol of the paper of cfg's method on dataset, or None for this paper's methods (whose own
    protocol is this paper's). With a regulariser of a later paper, the regulariser's paper's (its
    authors' code runs the combination, e.g. N-FGSM + ELLE-A). On a dataset its authors did not train
    on, their CIFAR-10 protocol without normalisation."""
    for m in reversed(select(cfg)):
        if m is not None and m.own:
            return m.own.get(dataset) or dataclasses.replace(m.own["cifar10"], normalize="none", augment="dataset")
    return None


def passes_of(cfg) -> str:
    """Forward+backward passes of one training step of cfg's method ('?' when unknown)."""
    perturbation, regulariser = select(cfg)
    base = "?" if perturbation is None else perturbation.passes_for(cfg)
    return base if regulariser is None else regulariser.passes_for(cfg, base)


def attack_defaults(attack: str) -> dict[str, Any]:
    """The defaults of flags that the methods training with this --attack set (N-FGSM's step)."""
    return {k: v for m in REGISTRY.values() if m.attack == attack for k, v in m.defaults.items()}


def states(cfg) -> dict[str, Any]:
    """Every state key of the registry (None), then the initial states of cfg's methods."""
    out: dict[str, Any] = {m.state_key: None for m in REGISTRY.values() if m.state_key}
    for m in select(cfg):
        if m is not None and m.state_key:
            out[m.state_key] = m.state(cfg)
    return out


def state_dict(states: dict[str, Any]) -> dict[str, Any]:
    """The methods' states as resume.pt keeps them: a tensor as it is, an object by its state_dict()."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in states.items()}


def load_state_dict(states: dict[str, Any], saved: dict, device) -> None:
    """Restores the states of `states` (this run's methods) from resume.pt's keys, onto device."""
    for key, current in states.items():
        value = saved.get(key)
        if value is None:
            continue
        if hasattr(current, "load_state_dict"):
            current.load_state_dict({k: v.to(device) if hasattr(v, "to") else v for k, v in value.items()})
        elif hasattr(value, "to"):  # a tensor
            states[key] = value.to(device)


# ------------------------------------------------------------------------------------------ recipes
def recipes() -> dict[str, Recipe]:
    """Every recipe by name, in REGISTRY's order."""
    return {name: r for m in REGISTRY.values() for name, r in m.recipes.items()}


PROTOCOLS = ("paper", "own")


def flags(method: str, eps: float, dataset: str, model: str | None = None, protocol: str = "paper") -> list[str]:
    """The train.py flags of a recipe at eps on dataset (schedule included where the dataset has one)
    for model (None: the protocol's, this paper's resnet18 under paper). protocol own: then the words of
    the method's own protocol, precision included (--protocol=own and its authors' network, --model=...,
    for a later method, which trains in fp32; --half_prec for this paper's methods), for a sweep whose
    common flags leave the precision out. An explicit model is named under own too."""
    table = recipes()
    if method not in table:
        raise ValueError(f"unknown method '{method}': choose from {', '.join(table)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}': choose from {', '.join(PROTOCOLS)}")
    owner = next(m for m in REGISTRY.values() if method in m.recipes)
    own = (owner.own.get(dataset, owner.own["cifar10"]) if owner.own else PAPER) if protocol == "own" else PAPER
    words = table[method].flags(eps, dataset, model or own.model)
    if protocol == "own":
        words += (["--protocol=own", f"--model={model or own.model}"] if owner.own else []) + (
            ["--half_prec"] if own.half_prec else [])
    return words


if __name__ == "__main__":
    # For one release, this module's old command line names its new tool instead of doing nothing.
    import shlex
    print(f"methods.py: error: its commands are sweep.py's now: python sweep.py {shlex.join(sys.argv[1:])}",
          file=sys.stderr)
    sys.exit(2)
