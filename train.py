"""FGSM / FGSM-RS / PGD / Free-AT adversarial training, optionally with GradAlign, and the later fast
methods of methods.py's registry.

Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS 2020,
arXiv 2007.02617.

    python train.py --dataset cifar10 --attack fgsm --attack_init zero --eps 8 \
        --grad_align_cos_lambda 0.2 --lr_max 0.30 --half_prec
    python train.py @recipes/gradalign_cifar10_eps8.args --seed 1     # flags from a file, then overrides

Sizes on the command line are in 1/255 units of inputs in [0, 1] (inside: Config.eps_frac). A run
writes out_dir/<run name>/: config.json, metrics.jsonl (one object per periodic evaluation), log.txt,
model.pth ({'last', 'best'} state_dicts, the format of the authors' released checkpoints) and
final.json (clean and PGD-50-10 accuracy; with --final_autoattack also AutoAttack's). Relaunching a
finished run does nothing (with --final_autoattack, eval.py's add_autoattack adds AutoAttack to a
final.json that lacks it); relaunching an interrupted one resumes from its last completed epoch.

Reading order: data -> the training step (its perturbation and regulariser: methods.py's registry)
-> evaluation -> the epoch loop -> run and main. Flags: config.py; the run directory: rundir.py;
the device, precision and memory layout: precision.py; the attacks and the regularisers' maths: utils.py.

Exit codes: 0 done or already done, 1 a file could not be written (a full disk, a file-size limit;
relaunching resumes), 2 bad input (nothing written), 3 the run is in progress elsewhere or this
process lost its lock, 4 the training loss became NaN or inf (config.EXIT_MEANINGS), 130 Ctrl-C.
SIGTERM or SIGUSR2 (preemption, a near time limit) stops the run: it releases the run's lock and ends
by that signal; relaunching resumes it. docs/reliability.md lists the cases behind each.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import cost
import data
import eval as evaluation
import lease
import methods
import models
import numerics
import precision
import rundir
import tracking
import utils
from config import EXIT_NONFINITE, EXIT_OK, EXIT_USAGE, Config, parse_config, record
from precision import NonFiniteLoss, forward_model
from rundir import RESUME_FILE, run_name


# ====================================================================== model, optimiser, schedule
def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(momentum 0.9) for the ResNets and WideResNets, Adam with coupled L2 for the CNNs; on all parameters."""
    if cfg.model not in ("cnn", "cnn_bn"):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr_max, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr_max, weight_decay=cfg.weight_decay)


def lr_at(t: float, schedule: str, lr_max: float, epochs: int, peak: float = 0.4) -> float:
    """Learning rate at fractional epoch t (t = epoch - 1 + (i + 1) / len(loader), as in the authors' loop).

    cyclic: linear 0 -> lr_max at floor(peak * E) epochs -> 0 at E (0 for t <= 0); peak 0.4 is the
    paper's floor(2E/5), 0.5 the later methods' mid-training. The product is exact (peak is read as
    the decimal fraction it is written as), so 0.4 gives floor(2E/5) for every E.
    piecewise: lr_max, then /10 from t/E >= 0.5 and /100 from t/E >= 0.75.
    """
    if schedule == "cyclic":
        top = math.floor(Fraction(repr(float(peak))) * epochs)
        return float(np.interp([t], [0, top, epochs], [0, lr_max, 0])[0])
    if schedule == "piecewise":
        frac = t / epochs
        return lr_max if frac < 0.5 else lr_max / 10 if frac < 0.75 else lr_max / 100
    raise ValueError(f"unknown lr schedule '{schedule}'")


def warmup_factor(cfg: Config, iteration: int) -> float:
    """SVHN's warm-up min(iteration / (5 * 73257 // batch_size), 1); 1 for every other dataset."""
    if cfg.dataset != "svhn":
        return 1.0
    return min(iteration / (5 * data.DATASETS["svhn"].n_train // cfg.batch_size), 1.0)


# ================================================================================== training step
@dataclass
class StepState:
    """What a training step reads besides the batch: the warm-up, the global iteration, whether this
    step's attack gradient keeps its graph (GradAlign through both gradients), the run's perturbation
    and regulariser (methods.py's entries, chosen from the flags at the first step) and their states
    across steps, by resume.pt key (Free-AT's delta, an adaptive lambda)."""
    warm: float = 1.0
    iteration: int = 0
    update: bool = True  # False: epoch 0's iteration, which takes no optimiser step
    grad1_graph: bool = False
    skipped: torch.Tensor | None = None  # written by the step: 1.0 if the GradScaler skipped it, else 0.0
    perturbation: methods.Method | None = None
    regulariser: methods.Method | None = None
    states: dict[str, Any] = field(default_factory=dict)
    device: torch.device | None = None  # where a resumed state goes

    def select(self, cfg: Config) -> None:
        """The methods of cfg; a state already given (a test's) is kept."""
        self.perturbation, self.regulariser = methods.select(cfg)
        self.states = {**methods.states(cfg), **self.states}

    def state_dict(self) -> dict:
        return methods.state_dict(self.states)

    def load_state_dict(self, saved: dict) -> None:
        methods.load_state_dict(self.states, saved, self.device)


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
    """One iteration: the method's perturbation, the loss at x + delta plus its regulariser (GradAlign:
    lambda * (1 - cos(grad at the attack's start, grad at x + eta)), eta ~ U[-eps, eps]^d), and the
    optimiser step. Returns the total loss (a 0-dim tensor, not synced).

    Train-mode forwards, in the order of the authors' code (they all update BatchNorm's running stats):
    the attack's, the monitoring pass at x (attacks that take no gradient at their start), the training
    forward, then the regulariser's (GradAlign's grad2 on every --grad_align_every-th iteration), then
    with --clean_forward one at x (ELLE's code).
    """
    if st.perturbation is None:
        st.select(cfg)
    st.update = update
    # does the regulariser apply now, and does it need the input gradient at the attack's start (grad1)?
    reg = st.regulariser
    reg_on = reg is not None and (reg.active is None or reg.active(cfg, st.iteration))
    wants_grad1 = reg_on and reg.start_grad is not None  # the regulariser uses the gradient at the start
    st.grad1_graph = wants_grad1 and reg.start_grad(cfg)
    # the perturbation to train on, then grad1 (or the monitoring forward at x)
    pert = st.perturbation.perturb(model, x, y, cfg, st)
    if pert.attack_grad is not None:
        grad1 = pert.attack_grad  # the attack's gradient: detached unless --grad_align_grad1 graph
    elif wants_grad1:  # monitoring gradient at x, by default with its graph: double backprop through both gradients
        pert.start, pert.start_clamp = torch.zeros_like(x), None
        grad1, _ = utils.input_grad(model, x, y, pert.start, create_graph=st.grad1_graph)
    else:  # the monitoring forward still updates BatchNorm's statistics; its gradient is not needed
        with torch.no_grad():
            model(x)
        grad1 = None
    # the loss at x + delta plus the regulariser, and the update (skipped in epoch 0)
    logits = model(x + pert.delta)
    loss = F.cross_entropy(logits, y)
    reg_value = reg.regularise(model, x, y, cfg, st, grad1, pert) if reg_on else torch.zeros((), device=x.device)
    total = loss + reg_value
    if cfg.clean_forward:  # its output is unused: only BatchNorm's running statistics move
        with torch.no_grad():
            model(x)
    st.skipped = torch.zeros((), device=x.device)
    if update:
        opt.zero_grad(set_to_none=True)
        st.skipped = precision.optimizer_step(opt, scaler, total)
    # training statistics, on the device
    with torch.no_grad():
        stats.add(total, reg_value, logits, y, grad1, torch.clamp(x + pert.delta, 0.0, 1.0) - x)
    return total.detach()


# ===================================================================================== evaluation
def periodic_evaluation(model, fwd_model, loaders: data.RunData, cfg: Config) -> dict:
    """Every eval_iter_freq iterations, in eval mode under the training precision (BatchNorm's
    running stats untouched): clean, FGSM and PGD-attack_iters accuracy on the test subset, PGD
    accuracy on the training subset (early stopping), cos_x_eta and cos_fgsm_pgd; CNN filter norms."""
    model.eval()
    layouts = precision.pass_layouts(cfg.channels_last, next(model.parameters()).device.type, cfg.model)
    if layouts["eval"] != layouts["train"]:  # one converted copy per evaluation
        fwd_model = precision.layout_copy(fwd_model, layouts["eval"])
    metrics = utils.periodic_metrics(fwd_model, loaders.test_subset, loaders.train_subset, cfg.eps_frac,
                                     cfg.pgd_alpha_eval, cfg.attack_iters, cfg.clamp_grad)
    model.train()
    if isinstance(model, (models.CNN, models.CNNBN)):
        metrics["filter_norms"] = model.first_layer_filters().detach().flatten(1).norm(dim=1).tolist()
    return metrics


# ===================================================================================== epoch loop
# Loop fields saved in resume.pt: as their value, as their state_dict() under their name, or with their
# state_dict()'s keys at the top level of resume.pt.
AS_VALUE, AS_STATE, FLAT = {"resume": "value"}, {"resume": "state"}, {"resume": "flat"}


@dataclass
class Loop:
    """The training loop's state: what it works on, and what it carries across epochs (the resumable
    fields, saved at each epoch's end in resume.pt, so an interrupted run resumes where it left off)."""
    cfg: Config
    run_dir: str
    model: nn.Module = field(metadata=AS_STATE)
    opt: torch.optim.Optimizer = field(metadata=AS_STATE)
    scaler: torch.amp.GradScaler = field(metadata=AS_STATE)
    guard: precision.FiniteGuard = field(metadata=FLAT)  # non-finite losses, float16's skipped steps
    fwd_model: nn.Module | None = None  # the model, under autocast with --half_prec
    step: StepState = field(default_factory=StepState, metadata=FLAT)  # the methods' states
    loaders: data.RunData | None = None
    log: rundir.RunLog | None = None
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)  # --log_to: a copy of metrics.jsonl
    best_state: dict | None = field(default=None, metadata=AS_VALUE)  # early stopping's 'best' weights
    best_acc: float = field(default=0.0, metadata=AS_VALUE)  # ... and their training-subset PGD accuracy
    next_epoch: int = field(default=0, metadata=AS_VALUE)
    iteration: int = field(default=0, metadata=AS_VALUE)  # global iteration counter (epoch 0 has one)
    train_seconds: float = field(default=0.0, metadata=AS_VALUE)  # training time, between host syncs
    mark: float = 0.0             # when the current stretch of training time began
    start: float = 0.0            # when this process started the loop

    def resume_state(self) -> dict:
        state = {}
        for f in dataclasses.fields(self):
            kind, value = f.metadata.get("resume"), getattr(self, f.name)
            if kind == "value":
                state[f.name] = value
            elif kind == "state":
                state[f.name] = value.state_dict()
            elif kind == "flat":
                state.update(value.state_dict())
        return state

    def restore(self, saved: dict) -> None:
        for f in dataclasses.fields(self):
            kind = f.metadata.get("resume")
            if kind == "value":
                setattr(self, f.name, saved[f.name])
            elif kind == "state":
                getattr(self, f.name).load_state_dict(saved[f.name])
            elif kind == "flat":
                getattr(self, f.name).load_state_dict(saved)

    def stop_clock(self) -> None:
        self.train_seconds += time.time() - self.mark

    def start_clock(self) -> None:
        self.mark = time.time()

    def keep_if_best(self, train_pgd_acc: float) -> None:
        """Early stopping: 'best' is replaced only on a strictly higher training PGD accuracy."""
        if train_pgd_acc > self.best_acc:
            self.best_acc = train_pgd_acc
            self.best_state = copy.deepcopy(self.model.state_dict())


def duration(seconds: float) -> str:
    """4.2 s, 3.4 min, 2.1 h or 5.0 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def cost_line(cfg: Config, n_final: int) -> str:
    """What the run will cost, said at its start (cost.py's count): training steps and their
    passes, periodic evaluations, the final evaluation."""
    counted = cost.run_cost(cfg)
    n_attack, n_restarts = cfg.final_attack
    weights = "last and best" if cfg.eval_early_stopped_model else "last"
    return (f"cost: {counted['steps']} training steps (epoch 0's one, then {cfg.epochs} epochs) of {counted['passes']} "
            f"forward+backward passes ({counted['label']}), {cost.periodic_evaluations(cfg)} periodic "
            f"evaluations, then PGD-{n_attack}-{n_restarts} of the {weights} weights on {n_final} test points; "
            "the time left is projected after the first epoch")


def projection_line(epoch: int, seconds: float, epochs_left: int) -> str:
    """The projected time left, from the wall time of this process's first epoch (evaluations included)."""
    return (f"epoch {epoch} took {duration(seconds)}: about {duration(seconds * epochs_left)} for the {epochs_left} "
            "epoch(s) left, then the final evaluation (projected from this epoch)")


def train(loop: Loop) -> None:
    """Epochs loop.next_epoch..E (epoch 0: one iteration, no optimiser step), evaluating every
    eval_iter_freq iterations and saving a resumable state at each epoch's end; after the first whole
    epoch of this process it logs the projected time left."""
    cfg, loaders, device = loop.cfg, loop.loaders, loop.guard.device
    metrics_path = os.path.join(loop.run_dir, "metrics.jsonl")
    n_iters = len(loaders.train)
    done = 0 if loop.next_epoch == 0 else 1 + (loop.next_epoch - 1) * n_iters
    first_epoch = max(loop.next_epoch, 1)
    bar = tqdm(total=1 + cfg.epochs * n_iters, initial=done, desc="train", unit="it", dynamic_ncols=True,
               leave=False, disable=None)  # disable=None: no bar when stderr is not a terminal
    loop.start = loop.mark = time.time()
    with bar:
        for epoch in range(loop.next_epoch, cfg.epochs + 1):
            epoch_start = time.time()
            stats = Stats(device)
            x_prev = y_prev = None
            for i, (x_drawn, y_drawn) in enumerate(loaders.train):
                if epoch == 0 and i > 0:
                    break
                # the batch: Free-AT replays the one drawn at i % m == 0
                x, y = (x_drawn, y_drawn) if i % cfg.minibatch_replay == 0 else (x_prev, y_prev)
                # learning rate and warm-up at this iteration
                lr = lr_at(epoch - 1 + (i + 1) / n_iters, cfg.lr_schedule, cfg.lr_max, cfg.epochs, cfg.lr_peak)
                loop.opt.param_groups[0]["lr"] = lr
                loop.step.warm = warmup_factor(cfg, loop.iteration)
                loop.step.iteration = loop.iteration
                # the method's step: perturbation, loss plus regulariser, update (none in epoch 0)
                loss = train_step(loop.fwd_model, loop.opt, loop.scaler, x, y, cfg, loop.step, stats,
                                  update=epoch > 0)
                loop.guard.count(loss, loop.step.skipped, loop.iteration)
                # periodic evaluation: finite checks, a metrics record, early stopping's best weights
                if loop.iteration % cfg.eval_iter_freq == 0:
                    loop.guard.check(loop.model, loop.iteration)
                    loop.stop_clock()
                    record = {"epoch": epoch, "iteration": loop.iteration, "lr": lr, **stats.means(),
                              "skipped_steps": loop.guard.take_skipped(),
                              **periodic_evaluation(loop.model, loop.fwd_model, loaders, cfg),
                              "fp32_redone_passes": precision.take_fp32_redos(loop.fwd_model),
                              "train_minutes": loop.train_seconds / 60, "elapsed_s": time.time() - loop.start}
                    rundir.append_jsonl(metrics_path, record)
                    loop.tracker.row(record)
                    loop.log(rundir.format_record(record))
                    loop.keep_if_best(record["train_pgd_acc"])
                    stats = Stats(device)
                    loop.start_clock()
                loop.iteration += 1
                x_prev, y_prev = x, y
                bar.update(1)
            # end of the epoch: finite checks and the resumable state
            loop.guard.check(loop.model, loop.iteration)
            loop.stop_clock()
            loop.next_epoch = epoch + 1
            rundir.save_resume_state(loop.run_dir, {**loop.resume_state(),
                                                    **resume_identity(cfg, os.path.basename(loop.run_dir), device)},
                                     loaders.train.generator)
            if epoch == first_epoch and epoch < cfg.epochs:  # this process's first whole epoch, more to come
                loop.log(projection_line(epoch, time.time() - epoch_start, cfg.epochs - epoch))
            loop.start_clock()


# =================================================================================== run and main
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def resume_identity(cfg: Config, name: str, device: torch.device) -> dict:
    """What ties resume.pt to its run: identity() and the layouts --channels_last gives on this device
    (auto's differ between device types; a resume that would change them is refused)."""
    layouts = precision.pass_layouts(cfg.channels_last, device.type, cfg.model)
    return {**rundir.identity(cfg, name), "layouts": precision.layout_names(layouts)}


def write_run_config(cfg: Config, name: str, device: torch.device) -> None:
    """config.json: the settings (with the sha256 of --methods_file), the run name and what this machine
    resolved (device, dtype, layouts, the final attack). Written at the first start, and again on resume
    if it went missing."""
    n_iters, n_restarts = cfg.final_attack
    rundir.write_config(os.path.join(cfg.out_dir, name), {
        **record(cfg), **({methods.FILE_HASH: methods.loaded_hash(cfg.methods_file)} if cfg.methods_file else {}),
        "run_name": name, "device_used": str(device),
        "half_prec_dtype_used": (str(precision.half_prec_dtype(cfg, device)).removeprefix("torch.")
                                 if cfg.half_prec else None),
        "layouts": precision.layout_names(precision.pass_layouts(cfg.channels_last, device.type, cfg.model)),
        "final_pgd": {"attack_iters": n_iters, "n_restarts": n_restarts,
                      "restart_rule": "robust only if no restart fools it"},
        "numerics": numerics.describe(device)})


def run(cfg: Config, name: str, device: torch.device, loaders: data.RunData) -> int:
    """Trains, saves model.pth, evaluates and writes final.json; resumes where a run left off."""
    run_dir = os.path.join(cfg.out_dir, name)
    if cfg.overwrite:
        rundir.clear_outputs(run_dir)
    seed_everything(cfg.seed)
    model = models.build_model(cfg.model, loaders.info.n_classes, loaders.info.shape, cfg.n_layers,
                               cfg.n_filters_cnn, cfg.normalize, cfg.wrn_depth, cfg.wrn_width)
    layouts = precision.pass_layouts(cfg.channels_last, device.type, cfg.model)
    model = precision.to_device(model, device, tf32=cfg.tf32, channels_last=layouts["train"]).train()
    scaler = precision.make_scaler(cfg, device)
    step = StepState(device=device)
    step.select(cfg)
    loop = Loop(cfg=cfg, run_dir=run_dir, model=model, fwd_model=forward_model(cfg, model, device, scaler),
                opt=make_optimizer(cfg, model), scaler=scaler, guard=precision.FiniteGuard(scaler.is_enabled(), device),
                step=step, loaders=loaders, log=rundir.RunLog(None if cfg.debug else os.path.join(run_dir, "log.txt")),
                best_state=copy.deepcopy(model.state_dict()))
    saved = rundir.load_resume_state(run_dir, loaders.train.generator, resume_identity(cfg, name, device))
    if saved is None:
        write_run_config(cfg, name, device)
        rundir.truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), 0)
        loop.log(f"run {name} on {device}")
    else:
        recorded = rundir.read_config(run_dir)
        if recorded is None:
            write_run_config(cfg, name, device)
        elif changed_file := methods.changed_since(recorded, cfg.methods_file):  # not the run's method code
            raise rundir.RunDirError(f"{changed_file}: resuming would train on with other code; restore the "
                                     "file, or relaunch with --overwrite")
        elif changed := numerics.differences(recorded.get("numerics"), numerics.describe(device)):
            loop.log(f"warning: resuming under other numerics than config.json records: {', '.join(changed)}; "
                     "the resumed epochs round differently")
        loop.restore(saved)
        loop.log(f"resuming {name} at epoch {loop.next_epoch} (iteration {loop.iteration})")
        for warning in rundir.damaged_metrics_warning(run_dir):
            loop.log(warning)
    loop.log(cost_line(cfg, loop.loaders.n_final))
    if cfg.log_to:  # the rows so far (a damaged line left out), which a resumed run's curves start with
        rows = rundir.read_jsonl_records(os.path.join(run_dir, "metrics.jsonl"))[0]
        loop.tracker = tracking.open_tracker(cfg.log_to, run_dir, name, record(cfg),
                                             [r for r in rows if isinstance(r.get("iteration"), int)],
                                             rundir.atomic_write_bytes)
    failed = True
    try:
        code = finish(loop, name, layouts)
        failed = code != EXIT_OK
        return code
    finally:
        loop.tracker.close(failed=failed)


def finish(loop: Loop, name: str, layouts: dict[str, bool]) -> int:
    """Trains the rest of the run, saves model.pth, evaluates and writes final.json."""
    cfg, model, run_dir, loaders = loop.cfg, loop.model, loop.run_dir, loop.loaders
    try:
        train(loop)
    except NonFiniteLoss as exc:
        print(f"train.py: error: {exc}; the last good state stays in {run_dir}/{RESUME_FILE}", file=sys.stderr)
        return EXIT_NONFINITE
    rundir.atomic_torch_save({"last": model.state_dict(), "best": loop.best_state},
                             os.path.join(run_dir, "model.pth"))
    final = {"last": evaluation.final_evaluation(cfg, model, model.state_dict(), loaders.test_final, "last")}
    if cfg.eval_early_stopped_model:
        final["best"] = evaluation.final_evaluation(cfg, model, loop.best_state, loaders.test_final, "best")
    n_iters, n_restarts = cfg.final_attack
    final.update({"n_eval": loaders.n_final,
                  "attack_iters": n_iters, "n_restarts": n_restarts, "eps": cfg.eps,
                  "eval_layout": precision.layout_names(layouts)["eval"],
                  "train_minutes": loop.train_seconds / 60, "best_train_pgd_acc": loop.best_acc,
                  **rundir.identity(cfg, name)})
    if cfg.final_autoattack:
        final["autoattack"] = evaluation.autoattack_eval.describe("autoattack")
    rundir.atomic_write_json(os.path.join(run_dir, "final.json"), final)
    rundir.remove_resume_state(run_dir)
    loop.tracker.final(final, loop.iteration - 1)
    for key in ("last", "best"):
        if key in final:
            loop.log(f"final ({key}): clean {final[key]['clean_acc']:.2%}, PGD-{n_iters}-{n_restarts} "
                     f"{final[key]['pgd_acc']:.2%} on {final['n_eval']} test points")
            if "aa_acc" in final[key]:
                loop.log(f"final ({key}): AutoAttack {final[key]['aa_acc']:.2%}")
    print(json.dumps({"run_dir": run_dir, **final}))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg, defaults = parse_config(argv)
    name = run_name(cfg, defaults)
    if problem := rundir.name_problem(name):  # before anything is created
        print(f"train.py: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = os.path.join(cfg.out_dir, name)
    # an oversize write (ulimit -f) then fails with EFBIG and is reported, instead of killing the process
    previous_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with numerics.threads(cfg.threads):
            return _main(cfg, name, run_dir)
    finally:
        signal.signal(signal.SIGXFSZ, previous_xfsz)


def _main(cfg: Config, name: str, run_dir: str) -> int:
    final_path = os.path.join(run_dir, "final.json")

    def done() -> tuple[bool, str | None]:
        """(whether the run is finished with nothing to add, what makes its final.json unusable)."""
        if cfg.overwrite:
            return False, None
        final, problem = rundir.finished_run(run_dir, rundir.identity(cfg, name))
        if final is not None:
            problem = rundir.config_problem(run_dir, cfg)  # a finished run is only as good as its record
        # AutoAttack is added by eval.py's add_autoattack
        return final is not None and not (cfg.final_autoattack and evaluation.lacks_autoattack(final_path)), problem
    finished, damage = done()
    if damage:
        print(f"train.py: error: {damage}", file=sys.stderr)
        return EXIT_USAGE
    if finished:  # before loading any data: relaunched sweeps are cheap
        print(f"{run_dir} is finished ({final_path} exists): nothing to do; --overwrite retrains it")
        return EXIT_OK
    try:
        device = precision.resolve_device(cfg.device, cfg.gpu)
        if cfg.device == "auto":
            print(precision.device_choice("train.py", device, cfg.half_prec, precision.half_prec_dtype(cfg, device)))
        loaders = None if os.path.exists(final_path) and not cfg.overwrite else data.load_run_data(cfg, device)
    except (ValueError, data.DataMissingError) as exc:  # data.DataUnreadableError included
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return rundir.interrupted("train.py", "nothing was written")
    try:
        rundir.make_run_dir(run_dir)
        with rundir.exclusive_run(run_dir, "train.py"):
            finished, damage = done()
            if damage:  # damaged while we waited for the lock
                print(f"train.py: error: {damage}", file=sys.stderr)
                return EXIT_USAGE
            if finished:  # finished while we waited for the lock
                print(f"{run_dir} is finished: nothing to do")
                return EXIT_OK
            if os.path.exists(final_path) and not cfg.overwrite:
                return evaluation.add_autoattack(cfg, run_dir, device, prog="train.py")
            return run(cfg, name, device, loaders or data.load_run_data(cfg, device))
    except (lease.RunLocked, rundir.RunDirError, lease.LockLost, OSError, KeyboardInterrupt) as exc:
        return rundir.stopped_with(exc, "train.py", run_dir)


if __name__ == "__main__":
    sys.exit(main())
