"""FGSM / FGSM-RS / PGD / Free-AT adversarial training, optionally with GradAlign.

Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS 2020,
arXiv 2007.02617.

    python train.py --dataset cifar10 --attack fgsm --attack_init zero --eps 8 \
        --grad_align_cos_lambda 0.2 --lr_max 0.30 --half_prec

Every perturbation size on the command line is in 1/255 units of inputs in [0, 1]; inside, eps is
converted once (Config.eps_frac). A run writes out_dir/<run name>/: config.json, metrics.jsonl (one
object per periodic evaluation), log.txt, model.pth ({'last', 'best'} state_dicts, the format of the
authors' released checkpoints) and final.json (clean and PGD-50-10 accuracy; with --final_autoattack
also AutoAttack's). Relaunching a finished run does nothing (with --final_autoattack it adds AutoAttack
to a final.json that lacks it, from model.pth); relaunching an interrupted one resumes from its last
completed epoch.

Reading order: flags and config (config.py) -> data -> the training perturbations and the training
step -> evaluation -> the epoch loop -> run and main. The run directory's plumbing is in rundir.py,
the attacks and GradAlign's regulariser in utils.py.

Exit codes: 0 done or already done, 2 bad input, 3 the run is in progress elsewhere, 4 the
training loss became NaN or inf (config.EXIT_MEANINGS). SIGTERM or SIGUSR2 (preemption, a near time
limit) stops the run: it releases the run's lock and ends by that signal; relaunching resumes it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import autoattack_eval
import data
import models
import rundir
import utils
from config import EXIT_LOCKED, EXIT_NONFINITE, EXIT_OK, EXIT_USAGE, Config, parse_config
from rundir import RESUME_FILE, run_name

# ===================================================================================== flags, config
# The flags, their checks and the frozen Config are in config.py (eval.py and launch.py share them):
# cfg, defaults = parse_config(argv). Sizes in Config are in 1/255 units; cfg.eps_frac is eps in [0, 1].


# ============================================================================================== data
@dataclass
class Data:
    """The loaders of one run (images in [0, 1] on the device)."""
    info: data.DatasetInfo
    train: data.Batches        # shuffled, augmented, drop_last
    train_subset: data.Batches  # first n_eval_every_k_iter, whole batch_size batches (early stopping)
    test_subset: data.Batches  # first n_eval_every_k_iter test points (periodic evaluation)
    test_final: data.Batches   # first n_final_eval test points (final evaluation)
    n_final: int               # how many points that is


def load_data(cfg: Config, device: torch.device) -> Data:
    """Loads both splits (DataMissingError if absent) and checks the sizes the flags ask for."""
    info = data.DATASETS[cfg.dataset]
    data.check_model_input(cfg.model, info.shape)
    train_split = data.load_split(cfg.dataset, cfg.data_dir, train=True, download=cfg.download)
    test_split = data.load_split(cfg.dataset, cfg.data_dir, train=False, download=cfg.download)
    if cfg.n_final_eval > len(test_split):
        raise ValueError(f"--n_final_eval {cfg.n_final_eval} exceeds the {len(test_split)} test points of "
                         f"{cfg.dataset}; use -1 for all")
    if len(train_split) < cfg.batch_size:
        raise ValueError(f"--batch_size {cfg.batch_size} exceeds the {len(train_split)} training points")
    on_device = cfg.data_on_device if cfg.data_on_device is not None else device.type == "cuda"
    gen_device = device if on_device else torch.device("cpu")
    generator = torch.Generator(device=gen_device).manual_seed(cfg.seed)

    def batches(split, batch_size, **kw):
        return data.Batches(split, batch_size, device=device, store_on_device=on_device, **kw)
    n_final = None if cfg.n_final_eval < 0 else cfg.n_final_eval
    return Data(
        info=info,
        train=batches(train_split, cfg.batch_size, shuffle=True, drop_last=True, crop_padding=info.crop_padding,
                      hflip=info.hflip, generator=generator),
        train_subset=batches(train_split, cfg.batch_size, shuffle=False, drop_last=True, n=cfg.n_eval_every_k_iter),
        test_subset=batches(test_split, cfg.batch_size_eval, shuffle=False, drop_last=False,
                            n=cfg.n_eval_every_k_iter),
        test_final=batches(test_split, cfg.batch_size_eval, shuffle=False, drop_last=False, n=n_final),
        n_final=len(test_split) if n_final is None else n_final)


# ================================================================================ model, optimiser
def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(momentum 0.9) for resnet18, Adam with coupled L2 for the CNN; on all parameters."""
    if cfg.model == "resnet18":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr_max, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr_max, weight_decay=cfg.weight_decay)


def warmup_factor(cfg: Config, iteration: int) -> float:
    """SVHN's warm-up min(iteration / (5 * 73257 // batch_size), 1); 1 for every other dataset."""
    if cfg.dataset != "svhn":
        return 1.0
    return min(iteration / (5 * data.DATASETS["svhn"].n_train // cfg.batch_size), 1.0)


# ========================================================================== training perturbations
@dataclass
class Perturbation:
    delta: torch.Tensor
    attack_grad: torch.Tensor | None  # fgsm/nfgsm: the input gradient at its start point (GradAlign's grad1)
    start: torch.Tensor | None = None  # that start point's delta, and the clamp rule of its forward
    start_clamp: str | None = None


@dataclass
class StepState:
    """What a training step reads besides the batch: the warm-up, Free-AT's persistent delta, the
    global iteration (GradAlign every k-th), ELLE-A's lambda rule, and whether this step's attack
    gradient must keep its graph (GradAlign through both gradients)."""
    warm: float = 1.0
    free_delta: torch.Tensor | None = None
    iteration: int = 0
    elle: utils.ElleAdaptive | None = None
    grad1_graph: bool = False
    skipped: torch.Tensor | None = None  # written by the step: 1.0 if the GradScaler skipped it, else 0.0


def perturb_fgsm(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    """FGSM (zero start), FGSM-RS (uniform start) or Free-AT (persistent delta, m > 1)."""
    eps = cfg.eps_frac
    if cfg.free_at:
        if st.free_delta is None:
            st.free_delta = torch.zeros_like(x)
        delta0 = st.free_delta
    else:
        delta0 = torch.zeros_like(x) if cfg.attack_init == "zero" else utils.uniform_delta(x, eps)
    step = st.warm * cfg.fgsm_alpha * eps  # SVHN warms the step multiplier only
    if cfg.zerograd_q > 0:  # ZeroGrad
        delta, grad = utils.zerograd_attack(model, x, y, delta0, eps, step, cfg.zerograd_q, cfg.clamp_grad,
                                            create_graph=st.grad1_graph)
    else:
        delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, step, cfg.clamp_grad, create_graph=st.grad1_graph)
    if cfg.free_at:
        st.free_delta = delta
    return Perturbation(delta, grad, delta0, cfg.clamp_grad)


def perturb_nfgsm(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    """N-FGSM: noise of k eps, one step of fgsm_alpha * eps, box-clamped only (outside the eps-ball);
    SVHN warms eps."""
    eps = st.warm * cfg.eps_frac
    delta, grad, eta = utils.nfgsm_attack(model, x, y, eps, cfg.nfgsm_noise_mult, cfg.fgsm_alpha * eps,
                                          create_graph=st.grad1_graph)
    return Perturbation(delta, grad, eta, None)


def perturb_pgd(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    """PGD-K training; SVHN warms eps of the start and the projection, not the step."""
    delta = utils.pgd_attack(model, x, y, st.warm * cfg.eps_frac, cfg.pgd_alpha_train_frac, cfg.pgd_train_n_iters,
                             random_start=cfg.attack_init == "random", clamp_rule=cfg.clamp_grad)
    return Perturbation(delta, None)


def perturb_pgd_corner(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    """PGD, then moved to the full-eps corner of its signs and box-clamped."""
    delta = cfg.eps_frac * torch.sign(perturb_pgd(model, x, y, cfg, st).delta)
    return Perturbation(torch.clamp(x + delta, 0.0, 1.0) - x, None)


def perturb_random_corner(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    """A random corner of the eps-ball, NOT box-clamped (as in the authors' code)."""
    return Perturbation(cfg.eps_frac * torch.sign(utils.uniform_delta(x, cfg.eps_frac)), None)


def perturb_none(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    return Perturbation(torch.zeros_like(x), None)


PERTURB: dict[str, Callable[..., Perturbation]] = {
    "fgsm": perturb_fgsm, "pgd": perturb_pgd, "pgd_corner": perturb_pgd_corner,
    "random_corner": perturb_random_corner, "none": perturb_none, "nfgsm": perturb_nfgsm}


# ================================================================================== training step
class Stats:
    """Training sums since the last evaluation, kept on the device (no host sync per step)."""
    NAMES = ("train_loss", "train_reg", "train_acc", "delta_l2", "grad_norm_x")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.NAMES) + 2, device=device)  # the sums, then the two example counts

    def add(self, loss, reg, logits, y, grad, delta_feasible) -> None:
        """grad: the input gradient of the step (None when the step computed none). A step with a
        non-finite number (under fp16, one the GradScaler skipped) is left out of every mean."""
        b = len(y)
        grad_norm = grad.detach().flatten(1).float().norm(dim=1).sum() if grad is not None else loss.new_zeros(())
        row = torch.stack([loss.detach().float() * b, reg.detach().float() * b,
                           (logits.argmax(1) == y).sum().float(), delta_feasible.flatten(1).norm(dim=1).sum(),
                           grad_norm.float(), loss.new_full((), b, dtype=torch.float32),
                           loss.new_full((), b if grad is not None else 0, dtype=torch.float32)])
        self.sums += torch.where(torch.isfinite(row).all(), row, torch.zeros_like(row))

    def means(self) -> dict[str, float | None]:
        """Per-example means; grad_norm_x is None when no step computed an input gradient."""
        *values, n, n_grad = self.sums.tolist()
        means = {name: v / max(n, 1) for name, v in zip(self.NAMES, values)}
        means["grad_norm_x"] = values[-1] / n_grad if n_grad else None
        return means


def train_step(model: nn.Module, opt, scaler, x, y, cfg: Config, st: StepState, stats: Stats,
               update: bool) -> torch.Tensor:
    """One iteration: the training attack, the loss at x + delta plus GradAlign's regulariser
    lambda * (1 - cos(grad at the attack's start, grad at x + eta)), eta ~ U[-eps, eps]^d, and the
    optimiser step. Returns the total loss (a 0-dim tensor, not synced).

    Train-mode forwards, in the order of the authors' code (they all update BatchNorm's running stats):
    the attack's, the monitoring pass at x (non-fgsm attacks), the training forward, grad2's. The
    regulariser is GradAlign's (on every --grad_align_every-th iteration) or ELLE's (one forward of
    three random points per example, after the training forward).
    """
    align = cfg.grad_align_cos_lambda > 0 and st.iteration % cfg.grad_align_every == 0  # GradAlign now
    st.grad1_graph = align and cfg.grad1_graph and cfg.grad_align_fd == 0
    pert = PERTURB[cfg.attack](model, x, y, cfg, st)
    if pert.attack_grad is not None:
        grad1 = pert.attack_grad  # the attack's gradient: detached unless --grad_align_grad1 graph
    elif align:  # monitoring gradient at x, by default with its graph: double backprop through both gradients
        pert.start, pert.start_clamp = torch.zeros_like(x), None
        grad1, _ = utils.input_grad(model, x, y, pert.start, create_graph=st.grad1_graph)
    else:  # the monitoring forward still updates BatchNorm's statistics; its gradient is not needed
        with torch.no_grad():
            model(x)
        grad1 = None
    logits = model(x + pert.delta)
    loss = F.cross_entropy(logits, y)
    reg = torch.zeros((), device=x.device)
    if align:
        reg = grad_align_term(model, x, y, cfg, grad1, pert)
    elif cfg.elle_lambda > 0:
        error = utils.elle_error(model, x, y, st.warm * cfg.eps_frac)
        reg = (st.elle.update(error) if st.elle is not None else cfg.elle_lambda) * error
    total = loss + reg
    st.skipped = torch.zeros((), device=x.device)
    if update:
        opt.zero_grad(set_to_none=True)
        st.skipped = optimizer_step(opt, scaler, total)
    with torch.no_grad():
        stats.add(total, reg, logits, y, grad1, torch.clamp(x + pert.delta, 0.0, 1.0) - x)
    return total.detach()


def grad_align_term(model, x, y, cfg: Config, grad1: torch.Tensor, pert: Perturbation) -> torch.Tensor:
    """GradAlign's regulariser for this step: grad2 at x + eta, eta ~ U[-eps, eps]^d; its parameter
    gradient by double backprop, or by finite differences of step --grad_align_fd."""
    eta = utils.uniform_delta(x, cfg.eps_frac)
    if cfg.grad_align_fd == 0:
        grad2, _ = utils.input_grad(model, x, y, eta, create_graph=True)
        return utils.grad_align_reg(grad1, grad2, cfg.grad_align_cos_lambda)
    grad2, _ = utils.input_grad(model, x, y, eta)
    return utils.grad_align_reg_fd(model, x, y, grad1, grad2, eta, cfg.grad_align_cos_lambda, cfg.grad_align_fd,
                                   delta1=pert.start if cfg.grad1_graph else None, clamp_rule1=pert.start_clamp)


def optimizer_step(opt, scaler: torch.amp.GradScaler, total: torch.Tensor) -> torch.Tensor:
    """Backward and optimiser step through the GradScaler. Returns, on the device (no host sync),
    1.0 if the step was skipped, else 0.0: with an enabled GradScaler (float16), as with the
    authors' apex, a step whose loss or gradients are not finite changes no weight and lowers
    the scale; without one (fp32, bf16) every step is taken."""
    if not scaler.is_enabled():
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        return torch.zeros((), device=total.device)
    one = torch.ones((), device=total.device)
    scale_before = scaler.scale(one)
    # A non-finite loss makes every gradient NaN (x 1.0 otherwise), so the GradScaler skips the step.
    guard = torch.where(torch.isfinite(total.detach()), 1.0, float("nan"))
    scaler.scale(total * guard).backward()
    scaler.step(opt)
    scaler.update()
    return (scaler.scale(one) < scale_before).float()  # the scale drops exactly when the step was skipped


def half_prec_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return utils.autocast_dtype(device.type, cfg.half_prec_dtype)


def forward_model(cfg: Config, model: nn.Module, device: torch.device, scaler: torch.amp.GradScaler) -> nn.Module:
    """The model every training and periodic-evaluation forward goes through: the model itself in
    fp32, or under --half_prec its utils.Autocast wrapper (input-gradient passes scaled by the
    GradScaler's scale under float16; BatchNorm in fp32 when GradAlign is on, as in the authors' code)."""
    if not cfg.half_prec:
        return model
    return utils.Autocast(model, device.type, half_prec_dtype(cfg, device), scaler=scaler,
                          batchnorm_fp32=cfg.grad_align_cos_lambda > 0)


# ===================================================================================== evaluation
def periodic_evaluation(model, fwd_model, loaders: Data, cfg: Config) -> dict:
    """Every eval_iter_freq iterations, in eval mode under the training precision (BatchNorm's
    running stats untouched): clean, FGSM and PGD-attack_iters accuracy on the test subset, PGD
    accuracy on the training subset (early stopping), cos_x_eta and cos_fgsm_pgd; CNN filter norms."""
    model.eval()
    layouts = utils.pass_layouts(cfg.channels_last, next(model.parameters()).device.type, cfg.model)
    if layouts["eval"] != layouts["train"]:  # one converted copy per evaluation
        fwd_model = utils.layout_copy(fwd_model, layouts["eval"])
    metrics = utils.periodic_metrics(fwd_model, loaders.test_subset, loaders.train_subset, cfg.eps_frac,
                                     cfg.pgd_alpha_eval, cfg.attack_iters, cfg.clamp_grad)
    model.train()
    if isinstance(model, (models.CNN, models.CNNBN)):
        metrics["filter_norms"] = model.first_layer_filters().detach().flatten(1).norm(dim=1).tolist()
    return metrics


def final_evaluation(cfg: Config, model: nn.Module, state_dict: dict, loaders: Data, label: str) -> dict:
    """fp32, eval mode: clean and PGD-50-10 (eps/4 steps) accuracy on the first n_final_eval test
    points; an example is robust only if no restart fools it. Also cos_x_eta on those points."""
    layouts = utils.pass_layouts(cfg.channels_last, next(model.parameters()).device.type, cfg.model)
    model = utils.set_layout(copy.deepcopy(model).float().eval(), layouts["eval"])
    model.load_state_dict(state_dict)
    n_iters, n_restarts = cfg.final_attack
    with tqdm(total=loaders.n_final, desc=f"PGD-{n_iters}-{n_restarts} ({label})", unit="img", leave=False,
              disable=None) as bar:
        result = utils.seeded_robust_accuracy(model, loaders.test_final, cfg.eps_frac, n_iters, n_restarts,
                                              cfg.seed, progress=bar.update)
    cos = utils.cos_x_eta(model, loaders.test_final, cfg.eps_frac, cfg.clamp_grad)
    out = {"clean_acc": result.clean_acc, "pgd_acc": result.pgd_acc, "cos_x_eta": cos}
    if cfg.final_autoattack:
        out.update(final_autoattack(cfg, model, loaders, label))
    return out


def final_autoattack(cfg: Config, model: nn.Module, loaders: Data, label: str) -> dict:
    """Standard AutoAttack on the final-evaluation points (model in fp32 and eval mode), seeded with
    --seed: {"aa_acc", "aa_stage_acc", "aa_grad_passes_per_example", "aa_forward_passes_per_example"}."""
    with tqdm(total=loaders.n_final, desc=f"AutoAttack ({label})", unit="img", leave=False, disable=None) as bar:
        result = autoattack_eval.attack_accuracy(model, loaders.test_final, cfg.eps_frac, "autoattack", cfg.seed,
                                                 loaders.info.n_classes, progress=bar.update)
    return result.result_fields()


def format_record(r: dict) -> str:
    return (f"{r['epoch']}-{r['iteration']}: [train] loss {r['train_loss']:.3f}, reg {r['train_reg']:.3f}, "
            f"acc {r['train_acc']:.2%}, acc_pgd {r['train_pgd_acc']:.2%}  [test] acc_clean "
            f"{r['test_clean_acc']:.2%}, acc_fgsm {r['test_fgsm_acc']:.2%}, acc_pgd {r['test_pgd_acc']:.2%}, "
            f"cos_x_eta {r['cos_x_eta']:.3f}, cos_fgsm_pgd {r['cos_fgsm_pgd']:.3f} "
            f"({r['train_minutes']:.2f}m, {r['elapsed_s'] / 60:.2f}m)")


# ===================================================================================== epoch loop
MAX_SKIPPED_IN_A_ROW = 100  # float16: the run stops after this many consecutive skipped steps
SKIP_COUNTERS = ("skipped_steps", "skipped_in_a_row", "stalled_at")  # Loop's float16 counters


class NonFiniteLoss(Exception):
    pass


@dataclass
class Loop:
    """The training loop's state: what it works on, and what it carries across epochs (saved at
    each epoch's end in resume.pt, so an interrupted run resumes where it left off)."""
    cfg: Config
    run_dir: str
    model: nn.Module
    fwd_model: nn.Module  # the model, under autocast with --half_prec
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loaders: Data
    log: rundir.RunLog
    device: torch.device
    first_bad_iter: torch.Tensor  # -1, or the first iteration whose loss was not finite (on the device)
    best_state: dict              # early stopping's 'best' weights
    best_acc: float = 0.0         # ... and their training-subset PGD accuracy
    next_epoch: int = 0
    iteration: int = 0            # global iteration counter (epoch 0 has one iteration)
    train_seconds: float = 0.0    # training time, counted between host syncs; evaluations left out
    step: StepState = dataclasses.field(default_factory=StepState)
    # float16 (a GradScaler): steps skipped since the last metrics record, the current run of skipped
    # steps, and -1 or the iteration where that run reached MAX_SKIPPED_IN_A_ROW. Device tensors.
    skipped_steps: torch.Tensor | None = None
    skipped_in_a_row: torch.Tensor | None = None
    stalled_at: torch.Tensor | None = None
    mark: float = 0.0             # when the current stretch of training time began
    start: float = 0.0            # when this process started the loop

    RESUMED = ("next_epoch", "iteration", "best_state", "best_acc", "train_seconds", "first_bad_iter")

    def resume_state(self) -> dict:
        return {**{k: getattr(self, k) for k in self.RESUMED + SKIP_COUNTERS}, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "free_delta": self.step.free_delta,
                "elle": None if self.step.elle is None else self.step.elle.state_dict()}

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])
        for k in self.RESUMED:
            setattr(self, k, saved[k])
        self.first_bad_iter = self.first_bad_iter.to(self.device)
        for k in SKIP_COUNTERS:
            setattr(self, k, saved[k].to(self.device) if k in saved else None)
        self.__post_init__()
        free_delta = saved["free_delta"]
        self.step.free_delta = None if free_delta is None else free_delta.to(self.device)
        elle = saved.get("elle")
        if self.step.elle is not None and elle is not None:  # ELLE-A's lambda and error statistics
            self.step.elle.load_state_dict({k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                            for k, v in elle.items()})

    def __post_init__(self):
        for name in SKIP_COUNTERS:
            if getattr(self, name) is None:
                setattr(self, name, torch.tensor(-1 if name == "stalled_at" else 0, device=self.device))

    def count_step(self, loss: torch.Tensor) -> None:
        """Bookkeeping of one step, on the device. float16 (a GradScaler): a non-finite step was
        skipped and counts; otherwise (fp32, bf16) the first non-finite loss is remembered."""
        if self.scaler.is_enabled():
            skipped = self.step.skipped.long()
            self.skipped_steps = self.skipped_steps + skipped
            self.skipped_in_a_row = (self.skipped_in_a_row + 1) * skipped
            stalled = (self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW) & (self.stalled_at < 0)
            self.stalled_at = torch.where(stalled, self.iteration, self.stalled_at)
        else:
            self.first_bad_iter = torch.where(~torch.isfinite(loss) & (self.first_bad_iter < 0), self.iteration,
                                              self.first_bad_iter)

    def check_finite(self) -> None:
        """Raises NonFiniteLoss (one host sync: the training work so far has finished): in fp32 and bf16
        after a non-finite loss; under float16 after MAX_SKIPPED_IN_A_ROW consecutive skipped steps;
        always when a weight is NaN or inf."""
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        bad, stalled, ok = torch.stack([self.first_bad_iter, self.stalled_at, weights_ok.long()]).tolist()
        if bad >= 0:
            raise NonFiniteLoss(f"the training loss became NaN or inf at iteration {bad}; lower --lr_max (or "
                                "check the data)")
        if stalled >= 0:
            raise NonFiniteLoss(f"{MAX_SKIPPED_IN_A_ROW} steps in a row were skipped for a non-finite loss or "
                                f"gradients (up to iteration {stalled}); lower --lr_max or use --half_prec_dtype "
                                "bfloat16")
        if not ok:
            raise NonFiniteLoss(f"the weights became NaN or inf by iteration {self.iteration}; lower --lr_max")

    def stop_clock(self) -> None:
        self.train_seconds += time.time() - self.mark

    def start_clock(self) -> None:
        self.mark = time.time()

    def keep_if_best(self, train_pgd_acc: float) -> None:
        """Early stopping: 'best' is replaced only on a strictly higher training PGD accuracy."""
        if train_pgd_acc > self.best_acc:
            self.best_acc = train_pgd_acc
            self.best_state = copy.deepcopy(self.model.state_dict())


def train(loop: Loop) -> None:
    """Epochs loop.next_epoch..E (epoch 0: one iteration, no optimiser step), evaluating every
    eval_iter_freq iterations and saving a resumable state at each epoch's end."""
    cfg, loaders, device = loop.cfg, loop.loaders, loop.device
    metrics_path = os.path.join(loop.run_dir, "metrics.jsonl")
    n_iters = len(loaders.train)
    done = 0 if loop.next_epoch == 0 else 1 + (loop.next_epoch - 1) * n_iters
    bar = tqdm(total=1 + cfg.epochs * n_iters, initial=done, desc="train", unit="it", dynamic_ncols=True,
               leave=False, disable=None)  # disable=None: no bar when stderr is not a terminal
    loop.start = loop.mark = time.time()
    with bar:
        for epoch in range(loop.next_epoch, cfg.epochs + 1):
            stats = Stats(device)
            x_prev = y_prev = None
            for i, (x, y) in enumerate(loaders.train):
                if epoch == 0 and i > 0:
                    break
                if i % cfg.minibatch_replay != 0:  # Free-AT replays the batch drawn at i % m == 0
                    x, y = x_prev, y_prev
                lr = utils.lr_at(epoch - 1 + (i + 1) / n_iters, cfg.lr_schedule, cfg.lr_max, cfg.epochs)
                loop.opt.param_groups[0]["lr"] = lr
                loop.step.warm = warmup_factor(cfg, loop.iteration)
                loop.step.iteration = loop.iteration
                loss = train_step(loop.fwd_model, loop.opt, loop.scaler, x, y, cfg, loop.step, stats,
                                  update=epoch > 0)
                loop.count_step(loss)
                if loop.iteration % cfg.eval_iter_freq == 0:
                    loop.check_finite()
                    loop.stop_clock()
                    record = {"epoch": epoch, "iteration": loop.iteration, "lr": lr, **stats.means(),
                              "skipped_steps": int(loop.skipped_steps),
                              **periodic_evaluation(loop.model, loop.fwd_model, loaders, cfg),
                              "train_minutes": loop.train_seconds / 60, "elapsed_s": time.time() - loop.start}
                    loop.skipped_steps = torch.zeros_like(loop.skipped_steps)
                    rundir.append_jsonl(metrics_path, record)
                    loop.log(format_record(record))
                    loop.keep_if_best(record["train_pgd_acc"])
                    stats = Stats(device)
                    loop.start_clock()
                loop.iteration += 1
                x_prev, y_prev = x, y
                bar.update(1)
            loop.check_finite()
            loop.stop_clock()
            loop.next_epoch = epoch + 1
            rundir.save_resume_state(loop.run_dir, loop.resume_state(), loaders.train.generator)
            loop.start_clock()


# =================================================================================== run and main
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def run(cfg: Config, name: str, device: torch.device, loaders: Data) -> int:
    """Trains, saves model.pth, evaluates and writes final.json; resumes where a run left off."""
    run_dir = os.path.join(cfg.out_dir, name)
    if cfg.overwrite:
        rundir.clear_outputs(run_dir)
    seed_everything(cfg.seed)
    model = models.build_model(cfg.model, loaders.info.n_classes, loaders.info.shape, cfg.n_layers,
                               cfg.n_filters_cnn)
    layouts = utils.pass_layouts(cfg.channels_last, device.type, cfg.model)
    model = utils.to_device(model, device, tf32=cfg.tf32, channels_last=layouts["train"]).train()
    float16 = cfg.half_prec and half_prec_dtype(cfg, device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=float16)
    loop = Loop(cfg=cfg, run_dir=run_dir, model=model, fwd_model=forward_model(cfg, model, device, scaler),
                opt=make_optimizer(cfg, model), scaler=scaler,
                loaders=loaders, log=rundir.RunLog(None if cfg.debug else os.path.join(run_dir, "log.txt")), device=device,
                first_bad_iter=torch.tensor(-1, device=device), best_state=copy.deepcopy(model.state_dict()),
                step=StepState(elle=utils.ElleAdaptive(lam_max=cfg.elle_lambda) if cfg.elle_adaptive else None))
    saved = rundir.load_resume_state(run_dir, loaders.train.generator)
    if saved is None:
        n_iters, n_restarts = cfg.final_attack
        rundir.write_config(run_dir, {
            **dataclasses.asdict(cfg), "run_name": name, "device_used": str(device),
            "layouts": utils.layout_names(layouts),
            "final_pgd": {"attack_iters": n_iters, "n_restarts": n_restarts,
                          "restart_rule": "robust only if no restart fools it"}})
        rundir.truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), 0)
        loop.log(f"run {name} on {device}")
    else:
        loop.restore(saved)
        loop.log(f"resuming {name} at epoch {loop.next_epoch} (iteration {loop.iteration})")
    try:
        train(loop)
    except NonFiniteLoss as exc:
        print(f"train.py: error: {exc}; the last good state stays in {run_dir}/{RESUME_FILE}", file=sys.stderr)
        return EXIT_NONFINITE
    rundir.atomic_torch_save({"last": model.state_dict(), "best": loop.best_state},
                             os.path.join(run_dir, "model.pth"))
    final = {"last": final_evaluation(cfg, model, model.state_dict(), loaders, "last")}
    if cfg.eval_early_stopped_model:
        final["best"] = final_evaluation(cfg, model, loop.best_state, loaders, "best")
    n_iters, n_restarts = cfg.final_attack
    final.update({"n_eval": loaders.n_final,
                  "attack_iters": n_iters, "n_restarts": n_restarts, "eps": cfg.eps,
                  "eval_layout": utils.layout_names(layouts)["eval"],
                  "train_minutes": loop.train_seconds / 60, "best_train_pgd_acc": loop.best_acc})
    if cfg.final_autoattack:
        final["autoattack"] = autoattack_eval.describe("autoattack")
    rundir.atomic_write_json(os.path.join(run_dir, "final.json"), final)
    rundir.remove_resume_state(run_dir)
    for key in ("last", "best"):
        if key in final:
            loop.log(f"final ({key}): clean {final[key]['clean_acc']:.2%}, PGD-{n_iters}-{n_restarts} "
                     f"{final[key]['pgd_acc']:.2%} on {final['n_eval']} test points")
            if "aa_acc" in final[key]:
                loop.log(f"final ({key}): AutoAttack {final[key]['aa_acc']:.2%}")
    print(json.dumps({"run_dir": run_dir, **final}))
    return EXIT_OK


def lacks_autoattack(cfg: Config, final_path: str) -> bool:
    """--final_autoattack was asked, and the finished run's final.json has no AutoAttack accuracy."""
    if not cfg.final_autoattack:
        return False
    with open(final_path) as f:
        final = json.load(f)
    return any(key in final and "aa_acc" not in final[key] for key in ("last", "best"))


def add_autoattack(cfg: Config, run_dir: str, device: torch.device, loaders: Data) -> int:
    """Adds AutoAttack of the saved weights to a finished run's final.json, without retraining."""
    final_path = os.path.join(run_dir, "final.json")
    with open(final_path) as f:
        final = json.load(f)
    model = models.build_model(cfg.model, loaders.info.n_classes, loaders.info.shape, cfg.n_layers,
                               cfg.n_filters_cnn)
    eval_layout = utils.pass_layouts(cfg.channels_last, device.type, cfg.model)["eval"]
    model = utils.to_device(model, device, channels_last=eval_layout).float().eval()
    try:
        for key in ("last", "best"):
            if key in final and "aa_acc" not in final[key]:
                models.load_state(model, models.read_checkpoint(os.path.join(run_dir, "model.pth"), key))
                final[key].update(final_autoattack(cfg, model, loaders, key))
    except models.CheckpointError as exc:
        print(f"train.py: error: {exc}; rerun with --overwrite to retrain", file=sys.stderr)
        return EXIT_USAGE
    final["autoattack"] = autoattack_eval.describe("autoattack")
    rundir.atomic_write_json(final_path, final)
    rundir.RunLog(None if cfg.debug else os.path.join(run_dir, "log.txt"))(
        "final: AutoAttack added to final.json: " + ", ".join(
            f"{key} {final[key]['aa_acc']:.2%}" for key in ("last", "best") if key in final))
    print(json.dumps({"run_dir": run_dir, **final}))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg, defaults = parse_config(argv)
    name = run_name(cfg, defaults)
    run_dir = os.path.join(cfg.out_dir, name)
    final_path = os.path.join(run_dir, "final.json")
    if os.path.exists(final_path) and not cfg.overwrite and not lacks_autoattack(cfg, final_path):
        # before loading any data: relaunched sweeps are cheap
        print(f"{run_dir} is finished ({final_path} exists): nothing to do; --overwrite retrains it")
        return EXIT_OK
    try:
        device = utils.resolve_device(cfg.device, cfg.gpu)
        loaders = load_data(cfg, device)
    except (ValueError, data.DataMissingError) as exc:  # data.DataUnreadableError included
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        print(f"train.py: error: cannot create {run_dir} ({exc.strerror}); pick another --out_dir", file=sys.stderr)
        return EXIT_USAGE
    lock = rundir.RunLock(run_dir, on_lost=lambda: lock_lost(run_dir))
    with rundir.stop_on_signals():
        try:
            lock.acquire()
            if os.path.exists(final_path) and not cfg.overwrite:  # finished while we waited for the lock
                if lacks_autoattack(cfg, final_path):
                    return add_autoattack(cfg, run_dir, device, loaders)
                print(f"{run_dir} is finished: nothing to do")
                return EXIT_OK
            return run(cfg, name, device, loaders)
        except rundir.RunLocked as exc:
            print(f"train.py: {run_dir} is in progress ({exc}); not starting it twice", file=sys.stderr)
            return EXIT_LOCKED
        except rundir.Stopped as exc:
            lock.release()  # before ending: a requeued job, on any node, can take the run over at once
            print(f"train.py: stopped by {signal.Signals(exc.signum).name}; {run_dir}/{RESUME_FILE} holds the "
                  "last finished epoch: relaunch the same command to resume", file=sys.stderr)
            signal.signal(exc.signum, signal.SIG_DFL)
            os.kill(os.getpid(), exc.signum)  # end as the signal would have ended us (status: killed by it)
            raise
        finally:
            lock.release()


def lock_lost(run_dir: str) -> None:
    """Called by the lock's refreshing thread when another process took the run over (this one had
    stalled for longer than the lease): stops this run through the SIGTERM path."""
    print(f"train.py: the lock of {run_dir} was taken over by another process (this one stalled longer than "
          "the lease); stopping", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
