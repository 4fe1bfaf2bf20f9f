"""FGSM / FGSM-RS / PGD / Free-AT adversarial training, optionally with GradAlign (SPEC §2-3).

    python train.py --dataset cifar10 --attack fgsm --attack_init zero --eps 8 \
        --grad_align_cos_lambda 0.2 --lr_max 0.30 --half_prec

Every perturbation size on the command line is in 1/255 units of inputs in [0, 1]; inside, eps is
converted once (Config.eps_frac). A run writes out_dir/<run name>/: config.json, metrics.jsonl (one
object per periodic evaluation), log.txt, model.pth ({'last', 'best'} state_dicts, the reference's
format) and final.json (clean and PGD-50-10 accuracy). Relaunching a finished run does nothing;
relaunching an interrupted one resumes from its last completed epoch.

Exit codes: 0 done or already done, 2 bad input, 3 the run is in progress elsewhere, 4 the
training loss became NaN or inf. SIGTERM or SIGUSR2 (preemption, a near time limit) stops the run:
it releases the run's lock and ends by that signal; relaunching resumes it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
import models
import utils

ATTACKS = ("fgsm", "pgd", "pgd_corner", "random_corner", "none")
EXIT_USAGE, EXIT_LOCKED, EXIT_NONFINITE = 2, 3, 4
RESUME_FILE = "resume.pt"


# ------------------------------------------------------------------------------------------ config
class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # --- the reference's flags: same names, defaults and meaning (SPEC §2)
    a("--batch_size", type=int, default=128, help="training batch size")
    a("--data_dir", default=os.environ.get("DATA_DIR", "./data"), help="dataset folder (env DATA_DIR)")
    a("--dataset", default="cifar10", choices=sorted(data.DATASETS), help="digits is the offline one")
    a("--model", default="resnet18", choices=models.MODELS, help="PreAct ResNet-18 or the small CNN")
    a("--epochs", type=int, default=30, help="training epochs (plus the one-iteration epoch 0)")
    a("--lr_schedule", default="cyclic", choices=("cyclic", "piecewise"))
    a("--lr_max", type=float, default=0.2, help="peak learning rate")
    a("--attack", default="fgsm", choices=ATTACKS, help="training attack (Free-AT: fgsm with --minibatch_replay>1)")
    a("--eps", type=float, default=8, help="L-inf radius in 1/255 units")
    a("--attack_iters", type=int, default=10, help="PGD steps of the periodic evaluation")
    a("--pgd_train_n_iters", type=int, default=10, help="PGD steps for --attack pgd training")
    a("--pgd_alpha_train", type=float, default=2.0, help="PGD training step in 1/255 units")
    a("--fgsm_alpha", type=float, default=1.25, help="FGSM step as a multiple of eps")
    a("--minibatch_replay", type=int, default=1, help="m of Free-AT: each batch is replayed m times")
    a("--weight_decay", type=float, default=5e-4)
    a("--attack_init", default="random", choices=("zero", "random"), help="start of FGSM/PGD training")
    a("--seed", type=int, default=0)
    a("--gpu", type=int, default=0, help="which GPU: same as --device cuda:N")
    a("--debug", action="store_true", help="no log file; final evaluation PGD-10 with 3 restarts")
    a("--half_prec", action="store_true",
      help="mixed precision for training and periodic evaluation (fp16 + GradScaler on CUDA, bf16 on CPU)")
    a("--grad_align_cos_lambda", type=float, default=0.0, help="GradAlign's lambda (0: off)")
    a("--eval_early_stopped_model", action="store_true", help="also evaluate the early-stopped ('best') weights")
    a("--eval_iter_freq", type=int, default=200, help="iterations between periodic evaluations")
    a("--n_eval_every_k_iter", type=int, default=256, help="size of the periodic-evaluation subsets")
    a("--n_layers", type=int, default=1, help="conv layers of --model cnn (the reference always used 1)")
    a("--n_filters_cnn", type=int, default=16, help="filters of --model cnn")
    a("--batch_size_eval", type=int, default=256)
    a("--n_final_eval", type=int, default=-1, help="first test points of the final evaluation (-1: all)")
    a("--fname", default="plain_cifar10", help="unused, kept for the reference's scripts")
    # --- additions
    a("--clamp_grad", default="zero", choices=utils.CLAMP_RULES,
      help="gradient of the box clamp in training attacks at pixels exactly 0 or 1: zero = the paper's "
           "runs (PyTorch 1.4), half = the reference code on PyTorch >= 1.10 (SPEC §3.0)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--download", action="store_true", help="download missing datasets through torchvision")
    a("--out_dir", default="runs", help="parent folder of the run directories")
    a("--overwrite", action="store_true", help="retrain even if the run has finished")
    a("--data_on_device", action=argparse.BooleanOptionalAction, default=None,
      help="keep the dataset on the GPU and augment there (default: on for CUDA)")
    return p


@dataclass(frozen=True)
class Config:
    """The command line, frozen; derived values are properties (eps etc. in [0, 1] units)."""
    batch_size: int
    data_dir: str
    dataset: str
    model: str
    epochs: int
    lr_schedule: str
    lr_max: float
    attack: str
    eps: float
    attack_iters: int
    pgd_train_n_iters: int
    pgd_alpha_train: float
    fgsm_alpha: float
    minibatch_replay: int
    weight_decay: float
    attack_init: str
    seed: int
    gpu: int
    debug: bool
    half_prec: bool
    grad_align_cos_lambda: float
    eval_early_stopped_model: bool
    eval_iter_freq: int
    n_eval_every_k_iter: int
    n_layers: int
    n_filters_cnn: int
    batch_size_eval: int
    n_final_eval: int
    fname: str
    clamp_grad: str
    device: str
    download: bool
    out_dir: str
    overwrite: bool
    data_on_device: bool | None

    @property
    def eps_frac(self) -> float:
        return self.eps / 255

    @property
    def pgd_alpha_eval(self) -> float:
        """Step of every evaluation PGD: eps / 4."""
        return self.eps_frac / 4

    @property
    def pgd_alpha_train_frac(self) -> float:
        return self.pgd_alpha_train / 255

    @property
    def free_at(self) -> bool:
        return self.attack == "fgsm" and self.minibatch_replay > 1

    @property
    def final_attack(self) -> tuple[int, int]:
        """(PGD steps, restarts) of the final evaluation: 50x10, or 10x3 with --debug."""
        return (10, 3) if self.debug else (50, 10)


# Settings that change results, in run-name order, with their short names (named when not the default).
# batch_size_eval: the final evaluation draws each PGD restart's random start batch by batch, so the
# batching decides which start each example gets. data_on_device: on CUDA it moves the data generator
# (shuffling, crops, flips) to the GPU, whose random streams differ from the CPU's.
NAME_FIELDS = {"epochs": "ep", "lr_schedule": "", "lr_max": "lr", "batch_size": "bs", "weight_decay": "wd",
               "fgsm_alpha": "fa", "minibatch_replay": "mr", "pgd_train_n_iters": "pgdk",
               "pgd_alpha_train": "pgda", "attack_iters": "ai", "n_layers": "nl", "n_filters_cnn": "nf",
               "eval_iter_freq": "eif", "n_eval_every_k_iter": "nek", "n_final_eval": "nfe",
               "half_prec": "hp", "debug": "debug", "eval_early_stopped_model": "es", "clamp_grad": "clamp-",
               "batch_size_eval": "bse", "data_on_device": "dod"}
# Config fields that are not in the run name, and why (a test checks that every field is named or here).
NOT_NAMED = {
    # the leading parts of every run name
    "dataset": "named first", "model": "named", "attack": "named", "attack_init": "named", "eps": "named",
    "grad_align_cos_lambda": "named", "seed": "named last",
    # where files are, what to do with them: no number depends on these
    "data_dir": "where the dataset is read from", "out_dir": "where the run directory goes",
    "fname": "unused, kept for the reference's scripts", "download": "fetches missing files, then reads the same",
    "overwrite": "whether a finished run is retrained",
    # which machine. cpu and cuda draw other random numbers and round differently, as two GPU models round
    # differently, which no name could tell apart; config.json records device_used. The name must also be
    # known before the device is: launch.py --status runs on a login node, a requeued job lands on any node.
    "device": "the hardware, recorded as device_used in config.json", "gpu": "which card of a machine",
}


def run_name(cfg: Config, defaults: dict) -> str:
    """dataset_model_attack_init_eps_lambda[_non-default settings]_seed: no spaces, no timestamps."""
    parts = [cfg.dataset, cfg.model, cfg.attack, cfg.attack_init, f"eps{cfg.eps:g}",
             f"lam{cfg.grad_align_cos_lambda:g}"]
    for field, short in NAME_FIELDS.items():
        value = getattr(cfg, field)
        if value != defaults[field]:
            parts.append(short if value is True else f"{short}{value:g}" if isinstance(value, (int, float))
                         else f"{short}{value}")
    parts.append(f"seed{cfg.seed}")
    return "_".join(parts)


def parse_config(argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parses and checks the flags that need no data; exits with code 2 on a bad one."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    problem = check_flags(cfg)
    if problem:
        parser.error(problem)
    defaults = {f.name: parser.get_default(f.name) for f in dataclasses.fields(Config)}
    return cfg, defaults


def check_flags(cfg: Config) -> str | None:
    """The first problem with the flags, as a one-line message naming the fix, or None."""
    checks = [
        (0 <= cfg.eps <= 255, f"--eps {cfg.eps:g} is outside [0, 255] (1/255 units: the paper uses 1..16)"),
        (cfg.fgsm_alpha > 0, f"--fgsm_alpha must be > 0 (got {cfg.fgsm_alpha:g}); the paper uses 1.0 or 1.25"),
        (cfg.lr_max >= 0, f"--lr_max must be >= 0 (got {cfg.lr_max:g}); give the peak learning rate, e.g. 0.2"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0 (got {cfg.weight_decay:g}); the paper uses 5e-4"),
        (cfg.epochs >= 0, f"--epochs must be >= 0 (got {cfg.epochs})"),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1 (got {cfg.batch_size})"),
        (cfg.batch_size_eval >= 1, f"--batch_size_eval must be >= 1 (got {cfg.batch_size_eval})"),
        (cfg.minibatch_replay >= 1, f"--minibatch_replay must be >= 1 (got {cfg.minibatch_replay})"),
        (cfg.eval_iter_freq >= 1, f"--eval_iter_freq must be >= 1 (got {cfg.eval_iter_freq})"),
        (cfg.attack_iters >= 0 and cfg.pgd_train_n_iters >= 0, "PGD iteration counts must be >= 0"),
        (cfg.n_layers >= 1 and cfg.n_filters_cnn >= 1, "--n_layers and --n_filters_cnn must be >= 1"),
        (cfg.n_final_eval != 0, "--n_final_eval 0 evaluates nothing: give a positive number or -1 for all"),
        (cfg.n_eval_every_k_iter >= cfg.batch_size,
         (f"--n_eval_every_k_iter {cfg.n_eval_every_k_iter} is below --batch_size {cfg.batch_size}: the "
          "early-stopping subset (whole training batches) would be empty; raise it or lower --batch_size")),
        (cfg.grad_align_cos_lambda >= 0, "--grad_align_cos_lambda must be >= 0"),
        (cfg.minibatch_replay == 1 or cfg.attack == "fgsm",
         "--minibatch_replay > 1 (Free-AT) needs --attack fgsm"),
    ]
    return next((message for ok, message in checks if not ok), None)


# -------------------------------------------------------------------------------------------- data
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


# -------------------------------------------------------------------------------- model, optimiser
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


# ---------------------------------------------------------------------------- training perturbations
@dataclass
class Perturbation:
    delta: torch.Tensor
    attack_grad: torch.Tensor | None  # fgsm: the input gradient at its start point (GradAlign's grad1)


@dataclass
class StepState:
    """What a training step reads besides the batch: the warm-up and Free-AT's persistent delta."""
    warm: float = 1.0
    free_delta: torch.Tensor | None = None


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
    delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, step, cfg.clamp_grad)
    if cfg.free_at:
        st.free_delta = delta
    return Perturbation(delta, grad)


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
    """A random corner of the eps-ball, NOT box-clamped (as in the reference)."""
    return Perturbation(cfg.eps_frac * torch.sign(utils.uniform_delta(x, cfg.eps_frac)), None)


def perturb_none(model, x, y, cfg: Config, st: StepState) -> Perturbation:
    return Perturbation(torch.zeros_like(x), None)


PERTURB: dict[str, Callable[..., Perturbation]] = {
    "fgsm": perturb_fgsm, "pgd": perturb_pgd, "pgd_corner": perturb_pgd_corner,
    "random_corner": perturb_random_corner, "none": perturb_none}


# ---------------------------------------------------------------------------------- one iteration
class Stats:
    """Training sums since the last evaluation, kept on the device (no host sync per step)."""
    NAMES = ("train_loss", "train_reg", "train_acc", "delta_l2", "grad_norm_x")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.NAMES), device=device)
        self.n = self.n_grad = 0

    def add(self, loss, reg, logits, y, grad, delta_feasible) -> None:
        """grad: the input gradient of the step (None when the step computed none)."""
        b = len(y)
        grad_norm = grad.detach().flatten(1).float().norm(dim=1).sum() if grad is not None else loss.new_zeros(())
        self.sums += torch.stack([loss.detach().float() * b, reg.detach().float() * b,
                                  (logits.argmax(1) == y).sum().float(), delta_feasible.flatten(1).norm(dim=1).sum(),
                                  grad_norm.float()])
        self.n += b
        self.n_grad += b if grad is not None else 0

    def means(self) -> dict[str, float | None]:
        """Per-example means; grad_norm_x is None when no step computed an input gradient."""
        values = self.sums.tolist()
        means = {name: v / max(self.n, 1) for name, v in zip(self.NAMES, values)}
        means["grad_norm_x"] = values[-1] / self.n_grad if self.n_grad else None
        return means


def train_step(model: nn.Module, opt, scaler, x, y, cfg: Config, st: StepState, stats: Stats,
               update: bool) -> torch.Tensor:
    """One iteration of SPEC §3.1 items 6-8; returns the total loss (a 0-dim tensor, not synced).

    Train-mode forwards, in the reference's order (they all update BatchNorm's running stats):
    the attack's, the monitoring pass at x (non-fgsm attacks), the training forward, grad2's.
    """
    lam = cfg.grad_align_cos_lambda
    pert = PERTURB[cfg.attack](model, x, y, cfg, st)
    if pert.attack_grad is not None:
        grad1 = pert.attack_grad  # detached: no double backprop through the FGSM gradient
    elif lam > 0:  # monitoring gradient at x, its graph kept: double backprop through both gradients
        grad1, _ = utils.input_grad(model, x, y, torch.zeros_like(x), create_graph=True)
    else:  # the monitoring forward still updates BatchNorm's statistics; its gradient is not needed
        with torch.no_grad():
            model(x)
        grad1 = None
    logits = model(x + pert.delta)
    loss = F.cross_entropy(logits, y)
    reg = torch.zeros((), device=x.device)
    if lam > 0:
        grad2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, cfg.eps_frac), create_graph=True)
        reg = utils.grad_align_reg(grad1, grad2, lam)
    total = loss + reg
    if update:
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
    with torch.no_grad():
        stats.add(total, reg, logits, y, grad1, torch.clamp(x + pert.delta, 0.0, 1.0) - x)
    return total.detach()


# ------------------------------------------------------------------------------------ the run itself
class NonFiniteLoss(Exception):
    pass


@dataclass(frozen=True)
class TestHooks:
    """Fault injection for the tests, off unless these environment variables are set:
    GRADALIGN_TEST_KILL_AT (SIGKILL this process at that global iteration) and
    GRADALIGN_TEST_NAN_AT (make the loss of that iteration NaN)."""
    kill_at: int = -1
    nan_at: int = -1

    @classmethod
    def from_env(cls) -> TestHooks:
        return cls(int(os.environ.get("GRADALIGN_TEST_KILL_AT", "-1")),
                   int(os.environ.get("GRADALIGN_TEST_NAN_AT", "-1")))

    def apply(self, iteration: int, loss: torch.Tensor) -> torch.Tensor:
        if iteration == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss * float("nan") if iteration == self.nan_at else loss


@dataclass
class RunState:
    """Everything the loop carries across epochs; saved at each epoch's end for resuming."""
    next_epoch: int
    iteration: int
    best_state: dict
    best_acc: float
    train_seconds: float
    first_bad_iter: torch.Tensor  # -1, or the first iteration whose loss was not finite
    free_delta: torch.Tensor | None = None


class RunLog:
    """The log: printed (above the progress bar) and appended to log.txt (not with --debug)."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, message: str) -> None:
        tqdm.write(message)
        if self.path:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state(data_generator: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": data_generator.get_state()}


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])


def periodic_evaluation(model, fwd_model, loaders: Data, cfg: Config) -> dict:
    """SPEC §3.1 item 9 in eval mode, under the training precision; BatchNorm stats untouched."""
    model.eval()
    metrics = utils.periodic_metrics(fwd_model, loaders.test_subset, loaders.train_subset, cfg.eps_frac,
                                     cfg.pgd_alpha_eval, cfg.attack_iters, cfg.clamp_grad)
    model.train()
    if isinstance(model, models.CNN):
        metrics["filter_norms"] = model.first_layer_filters().detach().flatten(1).norm(dim=1).tolist()
    return metrics


def check_finite(state: RunState) -> None:
    bad = int(state.first_bad_iter)
    if bad >= 0:
        raise NonFiniteLoss(bad)


def train(cfg: Config, model: nn.Module, loaders: Data, run_dir: str, state: RunState, opt, scaler,
          log: RunLog, device: torch.device) -> None:
    """Epochs state.next_epoch..E (epoch 0: one iteration, no optimiser step), evaluating every
    eval_iter_freq iterations and saving a resumable state at each epoch's end."""
    n_iters = len(loaders.train)
    done = 0 if state.next_epoch == 0 else 1 + (state.next_epoch - 1) * n_iters
    with tqdm(total=1 + cfg.epochs * n_iters, initial=done, desc="train", unit="it", dynamic_ncols=True,
              leave=False, disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
        train_epochs(cfg, model, loaders, run_dir, state, opt, scaler, log, device, bar)


def train_epochs(cfg: Config, model: nn.Module, loaders: Data, run_dir: str, state: RunState, opt, scaler,
                 log: RunLog, device: torch.device, bar: tqdm) -> None:
    fwd_model = utils.Autocast(model, device.type) if cfg.half_prec else model
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    n_iters = len(loaders.train)
    st = StepState(free_delta=state.free_delta)
    hooks = TestHooks.from_env()
    clock = Clock(state)
    for epoch in range(state.next_epoch, cfg.epochs + 1):
        stats = Stats(device)
        x_prev = y_prev = None
        for i, (x, y) in enumerate(loaders.train):
            if epoch == 0 and i > 0:
                break
            if i % cfg.minibatch_replay != 0:  # Free-AT replays the batch drawn at i % m == 0
                x, y = x_prev, y_prev
            lr = utils.lr_at(epoch - 1 + (i + 1) / n_iters, cfg.lr_schedule, cfg.lr_max, cfg.epochs)
            opt.param_groups[0]["lr"] = lr
            st.warm = warmup_factor(cfg, state.iteration)
            loss = train_step(fwd_model, opt, scaler, x, y, cfg, st, stats, update=epoch > 0)
            loss = hooks.apply(state.iteration, loss)
            state.first_bad_iter = torch.where(~torch.isfinite(loss) & (state.first_bad_iter < 0),
                                               state.iteration, state.first_bad_iter)
            if state.iteration % cfg.eval_iter_freq == 0:
                check_finite(state)  # syncs: the training work so far has finished
                clock.stop_training()
                record = {"epoch": epoch, "iteration": state.iteration, "lr": lr, **stats.means(),
                          **periodic_evaluation(model, fwd_model, loaders, cfg), **clock.times()}
                utils.append_jsonl(metrics_path, record)
                log(format_record(record))
                keep_if_best(state, model, record["train_pgd_acc"])
                stats = Stats(device)
                clock.start_training()
            state.iteration += 1
            x_prev, y_prev = x, y
            bar.update(1)
        check_finite(state)
        clock.stop_training()
        state.next_epoch, state.free_delta = epoch + 1, st.free_delta
        save_resume_state(run_dir, state, model, opt, scaler, loaders.train.generator, metrics_path)
        clock.start_training()


class Clock:
    """Training time, counted between host syncs (evaluations, epoch ends), so CUDA's asynchronous
    launches are not mistaken for finished work; evaluation time is left out."""

    def __init__(self, state: RunState):
        self.state, self.start, self.mark = state, time.time(), time.time()

    def stop_training(self) -> None:
        self.state.train_seconds += time.time() - self.mark

    def start_training(self) -> None:
        self.mark = time.time()

    def times(self) -> dict:
        return {"train_minutes": self.state.train_seconds / 60, "elapsed_s": time.time() - self.start}


def keep_if_best(state: RunState, model: nn.Module, train_pgd_acc: float) -> None:
    """Early stopping: 'best' is replaced only on a strictly higher training PGD accuracy."""
    if train_pgd_acc > state.best_acc:
        state.best_acc = train_pgd_acc
        state.best_state = copy.deepcopy(model.state_dict())


def format_record(r: dict) -> str:
    return (f"{r['epoch']}-{r['iteration']}: [train] loss {r['train_loss']:.3f}, reg {r['train_reg']:.3f}, "
            f"acc {r['train_acc']:.2%}, acc_pgd {r['train_pgd_acc']:.2%}  [test] acc_clean "
            f"{r['test_clean_acc']:.2%}, acc_fgsm {r['test_fgsm_acc']:.2%}, acc_pgd {r['test_pgd_acc']:.2%}, "
            f"cos_x_eta {r['cos_x_eta']:.3f}, cos_fgsm_pgd {r['cos_fgsm_pgd']:.3f} "
            f"({r['train_minutes']:.2f}m, {r['elapsed_s'] / 60:.2f}m)")


def save_resume_state(run_dir, state: RunState, model, opt, scaler, generator, metrics_path) -> None:
    utils.atomic_torch_save({
        "next_epoch": state.next_epoch, "iteration": state.iteration, "model": model.state_dict(),
        "opt": opt.state_dict(), "scaler": scaler.state_dict(), "best_state": state.best_state,
        "best_acc": state.best_acc, "train_seconds": state.train_seconds, "free_delta": state.free_delta,
        "first_bad_iter": state.first_bad_iter, "metrics_lines": len(utils.read_jsonl(metrics_path)),
        "rng": rng_state(generator)}, os.path.join(run_dir, RESUME_FILE))


def load_resume_state(run_dir, model, opt, scaler, generator, device) -> RunState | None:
    """The state saved at the last completed epoch (None if there is none); rewinds metrics.jsonl."""
    path = os.path.join(run_dir, RESUME_FILE)
    if not os.path.exists(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"], generator)
    free_delta = saved["free_delta"]
    utils.truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), saved["metrics_lines"])
    return RunState(next_epoch=saved["next_epoch"], iteration=saved["iteration"], best_state=saved["best_state"],
                    best_acc=saved["best_acc"], train_seconds=saved["train_seconds"],
                    first_bad_iter=saved["first_bad_iter"].to(device),
                    free_delta=None if free_delta is None else free_delta.to(device))


# -------------------------------------------------------------------------------- final evaluation
def final_evaluation(cfg: Config, model: nn.Module, state_dict: dict, loaders: Data, label: str) -> dict:
    """fp32, eval mode: clean and PGD-50-10 (eps/4 steps) accuracy on the first n_final_eval test
    points; an example is robust only if no restart fools it. Also cos_x_eta on those points."""
    model = copy.deepcopy(model).float().eval()
    model.load_state_dict(state_dict)
    n_iters, n_restarts = cfg.final_attack
    with tqdm(total=loaders.n_final, desc=f"PGD-{n_iters}-{n_restarts} ({label})", unit="img", leave=False,
              disable=None) as bar:
        result = utils.seeded_robust_accuracy(model, loaders.test_final, cfg.eps_frac, n_iters, n_restarts,
                                              cfg.seed, progress=bar.update)
    cos = utils.cos_x_eta(model, loaders.test_final, cfg.eps_frac, cfg.clamp_grad)
    return {"clean_acc": result.clean_acc, "pgd_acc": result.pgd_acc, "cos_x_eta": cos}


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_config(run_dir: str, cfg: Config, name: str, device: torch.device) -> None:
    utils.atomic_write_json(os.path.join(run_dir, "config.json"), {
        **dataclasses.asdict(cfg), "run_name": name, "torch_version": torch.__version__,
        "device_used": str(device), "git_commit": git_commit(), "argv": sys.argv[1:],
        "final_pgd": {"attack_iters": cfg.final_attack[0], "n_restarts": cfg.final_attack[1],
                      "restart_rule": "robust only if no restart fools it"}})


def clear_outputs(run_dir: str) -> None:
    """--overwrite: removes the previous run's files (only once this process holds the lock)."""
    for name in ("final.json", "model.pth", "metrics.jsonl", "log.txt", RESUME_FILE):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)


def run(cfg: Config, name: str, device: torch.device, loaders: Data) -> int:
    """Trains, saves model.pth, evaluates and writes final.json; resumes where a run left off."""
    run_dir = os.path.join(cfg.out_dir, name)
    if cfg.overwrite:
        clear_outputs(run_dir)
    log = RunLog(None if cfg.debug else os.path.join(run_dir, "log.txt"))
    seed_everything(cfg.seed)
    model = models.build_model(cfg.model, loaders.info.n_classes, loaders.info.shape, cfg.n_layers,
                               cfg.n_filters_cnn)
    model = utils.to_device(model, device).train()
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.half_prec and device.type == "cuda")
    state = load_resume_state(run_dir, model, opt, scaler, loaders.train.generator, device)
    if state is None:
        write_config(run_dir, cfg, name, device)
        utils.truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), 0)
        state = RunState(next_epoch=0, iteration=0, best_state=copy.deepcopy(model.state_dict()), best_acc=0.0,
                         train_seconds=0.0, first_bad_iter=torch.tensor(-1, device=device))
        log(f"run {name} on {device}")
    else:
        log(f"resuming {name} at epoch {state.next_epoch} (iteration {state.iteration})")
    try:
        train(cfg, model, loaders, run_dir, state, opt, scaler, log, device)
    except NonFiniteLoss as exc:
        print(f"train.py: error: the training loss became NaN or inf at iteration {exc.args[0]}; "
              f"lower --lr_max (or check the data); the last good state stays in {run_dir}/{RESUME_FILE}",
              file=sys.stderr)
        return EXIT_NONFINITE
    utils.atomic_torch_save({"last": model.state_dict(), "best": state.best_state},
                            os.path.join(run_dir, "model.pth"))
    final = {"last": final_evaluation(cfg, model, model.state_dict(), loaders, "last")}
    if cfg.eval_early_stopped_model:
        final["best"] = final_evaluation(cfg, model, state.best_state, loaders, "best")
    n_iters, n_restarts = cfg.final_attack
    final.update({"n_eval": loaders.n_final,
                  "attack_iters": n_iters, "n_restarts": n_restarts, "eps": cfg.eps,
                  "train_minutes": state.train_seconds / 60, "best_train_pgd_acc": state.best_acc})
    utils.atomic_write_json(os.path.join(run_dir, "final.json"), final)
    os.remove(os.path.join(run_dir, RESUME_FILE))
    for key in ("last", "best"):
        if key in final:
            log(f"final ({key}): clean {final[key]['clean_acc']:.2%}, PGD-{n_iters}-{n_restarts} "
                f"{final[key]['pgd_acc']:.2%} on {final['n_eval']} test points")
    print(json.dumps({"run_dir": run_dir, **final}))
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, defaults = parse_config(argv)
    name = run_name(cfg, defaults)
    run_dir = os.path.join(cfg.out_dir, name)
    final_path = os.path.join(run_dir, "final.json")
    if os.path.exists(final_path) and not cfg.overwrite:  # before loading any data: relaunched sweeps are cheap
        print(f"{run_dir} is finished ({final_path} exists): nothing to do; --overwrite retrains it")
        return 0
    try:
        device = utils.resolve_device(cfg.device, cfg.gpu)
        loaders = load_data(cfg, device)
    except (ValueError, data.DataMissingError) as exc:  # DataUnreadableError included
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        print(f"train.py: error: cannot create {run_dir} ({exc.strerror}); pick another --out_dir", file=sys.stderr)
        return EXIT_USAGE
    with stop_on_signals():
        return run_locked(cfg, name, device, loaders, run_dir)


def run_locked(cfg: Config, name: str, device: torch.device, loaders: Data, run_dir: str) -> int:
    """run() under the run directory's lock; exits 3 if a live process holds it."""
    final_path = os.path.join(run_dir, "final.json")
    lock = utils.RunLock(run_dir, on_lost=lambda: lock_lost(run_dir))
    try:
        lock.acquire()
        if os.path.exists(final_path) and not cfg.overwrite:  # finished while we waited for the lock
            print(f"{run_dir} is finished: nothing to do")
            return 0
        return run(cfg, name, device, loaders)
    except utils.RunLocked as exc:
        print(f"train.py: {run_dir} is in progress ({exc}); not starting it twice", file=sys.stderr)
        return EXIT_LOCKED
    except Stopped as exc:
        lock.release()  # before dying: a requeued job, on any node, can take the run over at once
        print(f"train.py: stopped by {signal.Signals(exc.signum).name}; {run_dir}/{RESUME_FILE} holds the last "
              "finished epoch: relaunch the same command to resume", file=sys.stderr)
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)  # end as the signal would have ended us (status: killed by it)
        raise
    finally:
        lock.release()


# SIGTERM: Slurm's preemption and scancel; SIGUSR2: submitit's warning before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Stopped(BaseException):
    """A stop signal arrived; raised in the main thread so the run's lock is released on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Turns STOP_SIGNALS into Stopped while training (main thread only; handlers restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def lock_lost(run_dir: str) -> None:
    """Called by the lock's heartbeat when another process took the run over: stop writing to it."""
    print(f"train.py: the lock of {run_dir} was taken over by another process (this one stalled longer than "
          "the lease); stopping", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
