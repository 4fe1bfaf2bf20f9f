"""Cost of each training method and of the PGD-50-10 evaluation, measured in this process (cost only:
the pass/fail check of a GPU, fp16 numerics included, is gpu_check.py).

    python bench.py                   # CPU-sized: cnn batch 128 on 8x8 digits, resnet18 batch 32 (< 3 min, 2 cores)
    python bench.py --device cuda     # GPU-sized: cnn batch 512, resnet18 batch 128, real PGD-50-10 on 1024 images
    python bench.py --models wrn28_10 # WideResNet-28-10 (batch 4 on CPU, 128 on CUDA), not in the default list

Training: one call of train.train_step (the real step, optimiser update included) for every recipe
of methods.py's registry (the paper's methods, the later ones, GradAlign with its finite-difference
gradient), in units of one forward+backward (parameter gradients,
train mode) of the same model on the same batch at the same precision. Every timed function runs
once per round, in turn, so a change in machine load hits all of them alike; a unit count is the
median over rounds of (step time / forward+backward time of that round).
Evaluation: utils.seeded_robust_accuracy (the final evaluation's code) on a cnn trained on digits
for a few seconds with train.main, and on an untrained resnet18 or wrn28_10 (random images whose labels are its own
predictions, so every example is attacked): images/s, forward+backward passes per example (the
reference attacks every example in every restart: steps x restarts of them), the robust accuracy
and the floor that accuracy implies (an example that stays robust costs every pass).
With --autoattack, also standard AutoAttack (autoattack_eval.py, torchattacks) on the digits cnn's
points, beside its PGD-50-10: images/s, forward+backward and forward-only passes per example, and
the accuracy after each of its four attacks (--quick: a custom version, 5 iterations, 50 queries).
On CUDA also the peak memory of each (torch.cuda.max_memory_allocated after a reset). On the CPU a
time budget (--budget_s, 150 s) caps the timing rounds, so a busy machine gives fewer rounds, not a
longer run.
Layouts (--parts layouts): each pass (evaluation attack at candidate batch sizes, training attack, GradAlign
step) in contiguous and channels_last layout, interleaved; the choice per pass, beside utils.LAYOUTS.
Reference (--parts reference): PGD-50-10 and the FGSM+GradAlign step beside the authors' versions
(restated below as reference_pgd_accuracy and reference_gradalign_step, with the same work per step as
their code) on the same model and points; --run RUN_DIR attacks a finished run's model on the points
of its final evaluation, and --authors_code DIR also times the authors' own rob_acc, imported from a
checkout of their repository, and checks that the restatement gives its robust accuracy.
Layout agreement (--parts layout_agreement, not in the default parts): the final PGD-50-10 on 1000 points
(cnn: the digits test split) in both layouts, the examples whose verdict differs counted.
Prints a table and writes --out (bench.json).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import math
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import autoattack_eval
import config
import data
import eval as evaluation
import methods
import models
import precision
import rundir
import train
import utils
from config import OneLineParser

# Training methods (methods.py's recipes at eps 8 with CIFAR-10's GradAlign lambda 0.2, without the
# sweep's schedule): label, the flags that select them in train.py, and the forward+backward passes one
# step makes (attack / monitoring pass at x / training pass; GradAlign adds grad2 and a double backprop).
BENCH_EPS = 8


def _method(flags: list[str]) -> tuple[str, list[str], str]:
    cfg, _ = config.config_and_defaults(config.build_parser().parse_args(flags))
    return methods.label_of(cfg), flags, methods.passes_of(cfg)


METHODS: dict[str, tuple[str, list[str], str]] = {
    name: _method([f for f in r.flags(BENCH_EPS, "cifar10") if not f.startswith(("--epochs", "--lr_max"))])
    for name, r in methods.recipes().items() if r.bench}
INPUT_SHAPES = {"cnn": (1, 8, 8), "cnn_bn": (1, 8, 8), "resnet18": (3, 32, 32),  # the CNNs bench on digits-shaped input
                "wrn28_10": (3, 32, 32)}
N_CLASSES = 10
EVAL_RESERVE_S = 25.0  # of the CPU time budget, kept for the evaluations (digits training included)
BENCH_LR = 1e-4  # learning rate of the timed steps: small, so repeated updates keep the weights finite

# The cost of the authors' evaluation by construction; their speed is measured live (--parts reference).
REFERENCE = {
    "eval_pgd_50_10": {"grad_passes_per_example": 500, "forwards_per_example": 10,
                       "note": "the authors' evaluation attacks every example in every restart: "
                               "10 restarts x 50 steps = 500 forward+backward passes, plus 10 forwards"},
}

# The digits cnn that the evaluation attacks: ~50% PGD-50-10 accuracy after a few seconds of training.
DIGITS_EPS = 48  # 1/255 units
DIGITS_TRAIN = ["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "16", "--attack", "pgd",
                "--attack_init", "random", "--pgd_train_n_iters", "5", "--pgd_alpha_train", "20",
                "--eps", str(DIGITS_EPS), "--clamp_grad", "half", "--lr_max", "0.01", "--debug"]


RUN_FILES = ("config.json", "model.pth", "final.json")  # what --run needs of a finished run
PARTS = ("steps", "eval", "layouts", "reference", "layout_agreement")
DEFAULT_PARTS = PARTS[:4]  # layout_agreement (minutes of CPU time for resnet18) runs only when asked for


@dataclass(frozen=True)
class EvalSize:
    """One evaluation: n_eval points in batches of batch_size, PGD-n_iters-n_restarts with eps/4 steps."""
    n_eval: int
    batch_size: int
    n_iters: int
    n_restarts: int


@dataclass(frozen=True)
class Settings:
    """The command line resolved for the device: every size the benchmark uses."""
    device: str
    models: tuple[str, ...]
    batch_sizes: dict[str, int]     # training batch of each model
    evals: dict[str, EvalSize]      # evaluation of each model
    digits_epochs: int              # training epochs of the evaluated digits cnn
    repeats: int                    # timed rounds (fewer if the time budget runs out; at least one)
    warmup: int                     # untimed calls of each function first
    min_sample_s: float             # a timed sample repeats a call until it lasts this long
    budget_s: float                 # seconds for the whole benchmark (0: no limit); bounds the rounds
    half_prec: bool
    threads: int
    out: str
    quick: bool
    autoattack: bool = False        # also AutoAttack on the digits cnn
    n_layers: int = 1               # conv layers of cnn and cnn_bn
    n_filters_cnn: int = 16         # their filters
    parts: tuple[str, ...] = PARTS  # what to measure
    eval_batch_candidates: dict[str, tuple[int, ...]] | None = None  # evaluation batch sizes tried per model
    agreement: dict[str, EvalSize] | None = None  # the final evaluation run in both layouts (layout_agreement)
    run: str | None = None          # a finished train.py run whose model and points the reference part attacks
    authors_code: str | None = None  # a checkout of the authors' repository: their rob_acc timed too


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--device", default="auto", help="auto (cuda if available; the default), cpu, cuda or cuda:N")
    a("--models", nargs="+", default=["cnn", "resnet18"], choices=list(INPUT_SHAPES), help="default: cnn resnet18")
    a("--batch_size", type=int, default=None,
      help="training batch of every model (default: cnn 128 / resnet18 32 / wrn28_10 4 on CPU, 512 / 128 / 128 "
           "on CUDA)")
    a("--repeats", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    a("--budget_s", type=float, default=None,
      help="seconds for the whole run, spent mostly on timing rounds: fewer rounds when the machine is slow "
           "or busy (default 150 on CPU, no limit on CUDA or with --quick)")
    a("--half_prec", action="store_true", help="training steps as train.py --half_prec (fp16 autocast on CUDA, "
      "bf16 on CPU); the evaluation stays fp32, as train.py's final one")
    a("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own choice)")
    a("--out", default="bench.json", help="where the numbers go")
    a("--quick", action="store_true", help="tiny sizes and one round (for the tests)")
    a("--autoattack", action="store_true",
      help=f"also time standard AutoAttack on the digits cnn (needs `{autoattack_eval.INSTALL}`)")
    a("--n_layers", type=int, default=1,
      help="conv layers of cnn and cnn_bn in the timed training steps (as train.py's flag)")
    a("--n_filters_cnn", type=int, default=16,
      help="filters of cnn and cnn_bn in the timed training steps (as train.py's flag)")
    a("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS,
      help="steps: training-step costs; eval: PGD-50-10 cost; layouts: each pass in both memory layouts and "
           "the evaluation at several batch sizes; reference: PGD-50-10 and the GradAlign step beside the "
           "authors' versions; layout_agreement: the final PGD-50-10 in both layouts, example by example "
           f"(default: {' '.join(DEFAULT_PARTS)})")
    a("--run", default=None, metavar="RUN_DIR",
      help="reference part: attack this finished train.py run's last weights with the attack, points, batch, eps, "
           "seed and layout of its final evaluation (final.json) instead of the bench's own models; the GradAlign "
           "step is then timed once, on the bench's model of the run's architecture")
    a("--authors_code", default=None, metavar="DIR",
      help="reference part: also time the authors' own utils.rob_acc from this checkout of "
           "github.com/tml-epfl/understanding-fast-adv-training (imported, not copied; apex is not needed for its "
           "fp32 path) beside the restatement, and check that both give the same robust accuracy")
    return p


def parse_settings(argv: list[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = utils.resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "auto":
        print(utils.device_choice("bench.py", device, args.half_prec, utils.autocast_dtype(device.type)))
    if (args.batch_size is not None and args.batch_size < 1) or (args.repeats is not None and args.repeats < 1):
        parser.error("--batch_size and --repeats must be >= 1")
    if args.autoattack and not autoattack_eval.available():
        parser.error(f"--autoattack needs torchattacks, an optional extra: run `{autoattack_eval.INSTALL}`")
    if args.autoattack and "cnn" not in args.models:
        parser.error("--autoattack times the digits cnn: add cnn to --models")
    if args.n_layers < 1 or args.n_filters_cnn < 1:
        parser.error("--n_layers and --n_filters_cnn must be >= 1")
    if (args.run or args.authors_code) and "reference" not in args.parts:
        parser.error("--run and --authors_code are for the reference part: add reference to --parts")
    if args.run and not all(os.path.isfile(os.path.join(args.run, f)) for f in RUN_FILES):
        parser.error(f"--run {args.run}: not a finished train.py run (it needs {', '.join(RUN_FILES)}); give a "
                     "run's folder under the --out_dir it was trained in")
    if args.authors_code and not os.path.isfile(os.path.join(args.authors_code, "utils.py")):
        parser.error(f"--authors_code {args.authors_code}: no utils.py there; give the folder of a checkout of "
                     "github.com/tml-epfl/understanding-fast-adv-training")
    cuda = device.type == "cuda"
    n_digits_test = len(data.load_split("digits", "", train=False))
    candidates = {"cnn": (128, 256, 512), "resnet18": (32, 64, 128), "wrn28_10": (2, 4)}
    if cuda:
        candidates = {"cnn": (512, 1024, 2048), "resnet18": (256, 512, 1024), "wrn28_10": (256, 512)}
    if args.quick:
        candidates = {"cnn": (16, 32), "resnet18": (2,), "wrn28_10": (2,)}
        batch_sizes = {"cnn": 16, "resnet18": 2, "wrn28_10": 2}
        evals = {"cnn": EvalSize(64, 64, 5, 2), "resnet18": EvalSize(2, 2, 2, 1), "wrn28_10": EvalSize(2, 2, 2, 1)}
        digits_epochs = 2
    elif cuda:
        batch_sizes = {"cnn": 512, "resnet18": 128, "wrn28_10": 128}
        evals = {"cnn": EvalSize(n_digits_test, 512, 50, 10), "resnet18": EvalSize(1024, 1024, 50, 10),
                 "wrn28_10": EvalSize(1024, 512, 50, 10)}
        digits_epochs = 15
    else:
        batch_sizes = {"cnn": 128, "resnet18": 32, "wrn28_10": 4}
        evals = {"cnn": EvalSize(n_digits_test, 512, 50, 10), "resnet18": EvalSize(32, 32, 5, 2),
                 "wrn28_10": EvalSize(4, 4, 2, 1)}
        digits_epochs = 15
    batch_sizes["cnn_bn"], evals["cnn_bn"], candidates["cnn_bn"] = batch_sizes["cnn"], evals["cnn"], candidates["cnn"]
    # the final evaluation's PGD-50-10 at train.py's evaluation batch, on 1000 points (cnn: the digits test split)
    final = config.defaults()["batch_size_eval"]
    agreement = {m: EvalSize(n_digits_test if m == "cnn" else 1000, final, 50, 10) for m in models.MODELS}
    if args.quick:
        agreement = {m: EvalSize(64, 32, 5, 2) if m == "cnn" else EvalSize(4, 2, 2, 1) for m in models.MODELS}
    if args.batch_size is not None:
        batch_sizes = dict.fromkeys(batch_sizes, args.batch_size)
    repeats = args.repeats or (1 if args.quick else 5)
    budget_s = args.budget_s if args.budget_s is not None else 0.0 if cuda or args.quick else 150.0
    return Settings(device=str(device), models=tuple(dict.fromkeys(args.models)), batch_sizes=batch_sizes,
                    evals=evals, digits_epochs=digits_epochs, repeats=repeats, warmup=3 if cuda else 1,
                    min_sample_s=0.0 if args.quick else 0.05, budget_s=budget_s, half_prec=args.half_prec,
                    threads=args.threads, quick=args.quick, out=args.out,
                    autoattack=args.autoattack,
                    n_layers=args.n_layers, n_filters_cnn=args.n_filters_cnn,
                    parts=tuple(p for p in PARTS if p in args.parts), eval_batch_candidates=candidates,
                    agreement=agreement, run=args.run, authors_code=args.authors_code)


# ------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, s: Settings,
                     deadline: float = math.inf) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round: after s.warmup untimed calls each,
    up to s.repeats rounds time every function in turn, in reverse order every other round (so that
    running first, or right after a long function, favours none of them); a round that would end after
    `deadline` (a time.perf_counter() value) is not started, but one always runs. A sample averages
    enough calls to last s.min_sample_s."""
    calls, round_s = {}, 0.0
    for name, fn in fns.items():
        last = min(seconds_per_call(fn, device, 1) for _ in range(max(s.warmup, 1)))
        calls[name] = max(1, math.ceil(s.min_sample_s / max(last, 1e-9)))
        round_s += calls[name] * last
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(s.repeats):
        if r > 0 and time.perf_counter() + round_s > deadline:
            break
        start = time.perf_counter()
        for name, fn in list(fns.items())[::-1 if r % 2 else 1]:
            samples[name].append(seconds_per_call(fn, device, calls[name]))
        round_s = time.perf_counter() - start
    return samples


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated CUDA memory during one call (model, optimiser state and batch included); None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------------------- training steps
def _cnn_flags(s: Settings) -> tuple[str, ...]:
    """The CNN's size as bench.py was asked for it, as train.py flags."""
    return ("--n_layers", str(s.n_layers), "--n_filters_cnn", str(s.n_filters_cnn))


def method_config(model_name: str, method: str, batch_size: int, device: str, *, half_prec: bool = False,
                  half_prec_dtype: str = "auto", extra: tuple[str, ...] = ()) -> train.Config:
    """train.py's frozen config for one method at eps BENCH_EPS (digits for the 8x8-input CNNs, cifar10 for the
    ResNets), through its own parser and checks; `extra` flags come last."""
    argv = ["--model", model_name, "--dataset", "digits" if INPUT_SHAPES[model_name] == (1, 8, 8) else "cifar10",
            "--batch_size", str(batch_size), "--n_eval_every_k_iter", str(max(256, batch_size)),
            "--eps", str(BENCH_EPS), "--device", device, *METHODS[method][1]]
    if half_prec:
        argv += ["--half_prec", "--half_prec_dtype", half_prec_dtype]
    return train.parse_config(argv + list(extra))[0]


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The unit: one forward and backward (parameter gradients) of the batch, as a training pass makes."""
    def call() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return call


def make_scaler(cfg: train.Config, device: torch.device) -> torch.amp.GradScaler:
    """train.py's GradScaler: enabled under --half_prec with float16."""
    return precision.make_scaler(cfg, device)


def training_step(model: nn.Module, opt, scaler, x, y, cfg: train.Config, device) -> Callable[[], torch.Tensor]:
    """One real train.train_step with the optimiser update; Free-AT's delta persists across calls."""
    state, stats = train.StepState(), train.Stats(device)  # the step creates the method's state

    def call() -> torch.Tensor:
        loss = train.train_step(model, opt, scaler, x, y, cfg, state, stats, update=True)
        state.iteration += 1
        return loss
    return call


def device_settings(model: nn.Module, device: torch.device) -> dict:
    """What the code under test set up (utils.to_device decides channels_last and cuDNN autotuning)."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs):
        channels_last = True
    elif any(p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last) for p in convs):
        channels_last = False
    else:
        channels_last = None  # every weight has one input channel or 1x1 kernels: both layouts coincide
    out = {"channels_last_weights": channels_last, "channels_last_inputs": False,
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out.update(cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out


def bench_steps(model_name: str, s: Settings, device: torch.device, deadline: float = math.inf) -> dict:
    """Step cost of every method for one model, in forward+backward units of the same batch."""
    torch.manual_seed(0)
    batch_size, shape = s.batch_sizes[model_name], INPUT_SHAPES[model_name]
    model = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
    model = utils.to_device(model, device, channels_last=utils.pass_layouts("auto", device.type, model_name)["train"])
    model = model.train()
    fwd_model = utils.Autocast(model, device.type) if s.half_prec else model
    x = torch.rand(batch_size, *shape, device=device)
    y = torch.randint(0, N_CLASSES, (batch_size,), device=device)
    fns = {"unit": forward_backward(fwd_model, x, y)}
    for method in METHODS:
        cfg = method_config(model_name, method, batch_size, s.device, half_prec=s.half_prec, extra=_cnn_flags(s))
        opt = train.make_optimizer(cfg, model)
        opt.param_groups[0]["lr"] = BENCH_LR
        scaler = make_scaler(cfg, device)
        fns[method] = training_step(precision.forward_model(cfg, model, device, scaler), opt, scaler, x, y, cfg, device)
    samples = time_interleaved(fns, device, s, deadline)
    unit = samples["unit"]
    result = {"batch_size": batch_size, "input_shape": list(shape), "settings": device_settings(model, device),
              "rounds": len(unit),
              "unit_ms": 1e3 * statistics.median(unit), "unit_samples_ms": [1e3 * t for t in unit],
              "unit_peak_mib": peak_memory_mib(fns["unit"], device), "methods": {}}
    for method, (label, flags, passes) in METHODS.items():
        steps = samples[method]
        result["methods"][method] = {
            "label": label, "flags": flags, "passes": passes,
            "units": statistics.median(t / u for t, u in zip(steps, unit)),
            "ms": 1e3 * statistics.median(steps), "samples_ms": [1e3 * t for t in steps],
            "peak_mib": peak_memory_mib(fns[method], device)}
    return result


# -------------------------------------------------------------------------------------- evaluation
def train_digits_cnn(s: Settings, device: torch.device) -> tuple[nn.Module, float, float]:
    """A cnn PGD-5-trained on digits with train.main (quietly, in a temporary folder).
    Returns (model in eval mode, eps in [0, 1] units, training seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*DIGITS_TRAIN, "--epochs", str(s.digits_epochs), "--n_final_eval", "64", "--out_dir", tmp,
                "--device", s.device]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = train.main(argv)
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"train.main exited with {code} training the digits cnn: {err.getvalue().strip()}")
        cfg, defaults = train.parse_config(argv)
        state = models.read_checkpoint(os.path.join(tmp, train.run_name(cfg, defaults), "model.pth"), "last")
    model = models.build_model("cnn", N_CLASSES, INPUT_SHAPES["cnn"], cfg.n_layers, cfg.n_filters_cnn)
    models.load_state(model, state)
    return utils.to_device(model, device).eval(), cfg.eps_frac, seconds


def timed_robust_accuracy(model: nn.Module, batches, eps: float, size: EvalSize, device: torch.device) -> dict:
    """Runs the final evaluation's attack once; its speed, cost per example and accuracies, and how
    many batch sizes the model saw (early exit shrinks the batches; with cudnn.benchmark on, cuDNN
    autotunes each new size)."""
    sizes: set[int] = set()
    hook = model.register_forward_pre_hook(lambda _module, inputs: sizes.add(inputs[0].shape[0]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        synchronize(device)
        start = time.perf_counter()
        result = utils.seeded_robust_accuracy(model, batches, eps, size.n_iters, size.n_restarts, seed=0)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    full = size.n_iters * size.n_restarts
    passes = result.grad_passes / result.n_eval
    return {**asdict(size), "attack": f"PGD-{size.n_iters}-{size.n_restarts}", "eps": eps, "seconds": seconds,
            "images_per_s": result.n_eval / seconds, "clean_acc": result.clean_acc, "robust_acc": result.pgd_acc,
            "passes_per_example": passes, "reference_passes_per_example": full,
            "floor_passes_per_example": full * result.pgd_acc,
            "pass_examples_per_s": result.grad_passes / seconds,
            "images_per_s_without_early_exit": result.grad_passes / seconds / full,
            "distinct_batch_sizes": len(sizes),
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def timed_autoattack(model: nn.Module, batches, eps: float, s: Settings, device: torch.device) -> dict:
    """AutoAttack once on the points of the PGD evaluation: speed, passes per example, accuracies."""
    budget = {"n_iters": 5, "square_queries": 50} if s.quick else {}
    synchronize(device)
    start = time.perf_counter()
    result = autoattack_eval.attack_accuracy(model, batches, eps, "autoattack", 0, N_CLASSES, **budget)
    synchronize(device)
    seconds = time.perf_counter() - start
    n = result.n_eval
    return {**result.description(), "seconds": seconds, "images_per_s": n / seconds, "clean_acc": result.clean_acc,
            "robust_acc": result.robust_acc, "stage_acc": result.stage_acc,
            "grad_passes_per_example": result.grad_passes / n, "forward_passes_per_example": result.forward_passes / n}


def bench_eval(model_name: str, s: Settings, device: torch.device, digits: tuple | None = None) -> dict:
    """cnn: the trained digits model on the first test points; resnet18, wrn28_10 and cnn_bn: untrained, on random
    images whose labels are its own clean predictions (clean accuracy 1, so every example is attacked)."""
    size = s.evals[model_name]
    if model_name == "cnn":
        model, eps, train_s = digits or train_digits_cnn(s, device)
        model = utils.set_layout(model, utils.pass_layouts("auto", device.type, model_name)["eval"])
        split = data.load_split("digits", "", train=False)
        batches = data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval, device=device)
        result = {"data": f"digits test, cnn trained {s.digits_epochs} epochs with PGD-5 (eps {DIGITS_EPS}/255)",
                  "train_seconds": train_s, **timed_robust_accuracy(model, batches, eps, size, device)}
        if s.autoattack:
            result["autoattack"] = timed_autoattack(model, batches, eps, s, device)
        return result
    torch.manual_seed(0)
    shape = INPUT_SHAPES[model_name]
    model = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
    model = utils.to_device(model, device, channels_last=utils.pass_layouts("auto", device.type, model_name)["eval"])
    model = model.eval()
    x = torch.rand(size.n_eval, *shape, device=device)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(1) for part in x.split(size.batch_size)])
    batches = list(zip(x.split(size.batch_size), y.split(size.batch_size)))
    return {"data": "random images, the untrained model's predictions as labels", "train_seconds": 0.0,
            **timed_robust_accuracy(model, batches, 8 / 255, size, device)}


# ------------------------------------------------------------------------------------- memory layouts
def synthetic_batch(shape, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform images of this shape with random labels."""
    return (torch.rand(batch_size, *shape, device=device),
            torch.randint(0, N_CLASSES, (batch_size,), device=device))


def layout_pair(model_name: str, s: Settings, device: torch.device) -> dict[bool, nn.Module]:
    """The same weights twice: contiguous (False) and channels_last (True)."""
    torch.manual_seed(0)
    shape = INPUT_SHAPES[model_name]
    base = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
    pair = {}
    for cl in (False, True):
        model = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
        model.load_state_dict(base.state_dict())
        pair[cl] = utils.to_device(model, device, channels_last=cl)
    return pair


def eval_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One pass of an evaluation attack: eval mode, the input gradient (inputs in the weights' layout)."""
    x = x.contiguous(memory_format=utils.input_layout(model))
    delta = torch.zeros_like(x)

    def call():
        model.eval()
        return utils.input_grad(model, x, y, delta)
    return call


def train_attack_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One pass of a training attack: train mode, the input gradient at the clamped point (FGSM's)."""
    delta = torch.zeros_like(x)

    def call():
        model.train()
        return utils.input_grad(model, x, y, delta, clamp_rule="zero")
    return call


def bench_layouts(model_name: str, s: Settings, device: torch.device, deadline: float = math.inf) -> dict:
    """Each pass in both layouts, timed side by side: the evaluation attack's pass at every candidate
    evaluation batch size, the training attack's pass and the GradAlign training step at the training
    batch size (training inputs stay contiguous: converting them would cost a copy per step). The choice
    per pass is channels_last where it was at least utils.LAYOUT_MIN_GAIN faster (median over rounds of
    the per-round ratio; utils.LAYOUTS also asks the layout_agreement part's bound); the evaluation
    batch is the candidate with the least time per example."""
    pair = layout_pair(model_name, s, device)
    shape, batch = INPUT_SHAPES[model_name], s.batch_sizes[model_name]
    sizes = s.eval_batch_candidates[model_name]
    x, y = synthetic_batch(shape, max(*sizes, batch), device)
    fns = {}
    for cl, model in pair.items():
        name = "channels_last" if cl else "contiguous"
        for b in sizes:
            fns[(name, "eval", b)] = eval_pass(model, x[:b], y[:b])
        fns[(name, "train_attack", batch)] = train_attack_pass(model, x[:batch], y[:batch])
        cfg = method_config(model_name, "gradalign", batch, s.device, half_prec=s.half_prec, extra=_cnn_flags(s))
        opt = train.make_optimizer(cfg, model)
        opt.param_groups[0]["lr"] = BENCH_LR
        scaler = make_scaler(cfg, device)
        fns[(name, "train_step", batch)] = training_step(model.train(), opt, scaler, x[:batch], y[:batch], cfg, device)
    samples = time_interleaved(fns, device, s, deadline)
    rows = [{"layout": k[0], "pass": k[1], "batch_size": k[2], "ms": 1e3 * statistics.median(v),
             "us_per_example": 1e6 * statistics.median(v) / k[2], "samples_ms": [1e3 * t for t in v]}
            for k, v in samples.items()]
    gains = {}
    for key in fns:
        if key[0] == "contiguous":
            other = ("channels_last", *key[1:])
            gains[f"{key[1]}@{key[2]}"] = statistics.median(c / cl for c, cl in zip(samples[key], samples[other]))
    chosen = {"train": gains[f"train_step@{batch}"] >= utils.LAYOUT_MIN_GAIN,
              "eval": statistics.median(gains[f"eval@{b}"] for b in sizes) >= utils.LAYOUT_MIN_GAIN}
    eval_name = "channels_last" if chosen["eval"] else "contiguous"
    per_example = {b: statistics.median(samples[(eval_name, "eval", b)]) / b for b in sizes}
    table = utils.pass_layouts("auto", device.type, model_name)
    return {"model": model_name, "rounds": len(samples[("contiguous", "eval", sizes[0])]), "rows": rows,
            "channels_last_speedup": gains, "chosen": utils.layout_names(chosen),
            "chosen_eval_batch_size": min(per_example, key=per_example.get),
            "table": utils.layout_names(table), "table_agrees": table == chosen,
            "train_attack_choice": utils.layout_names({"x": gains[f"train_attack@{batch}"]
                                                       >= utils.LAYOUT_MIN_GAIN})["x"]}


def format_layouts(r: dict) -> str:
    gains = ", ".join(f"{k} {v:.2f}x" for k, v in r["channels_last_speedup"].items())
    differs = ("" if r["table_agrees"]
               else ": DIFFERS (a faster layout is taken only if --parts layout_agreement holds its bound)")
    eval_batches = ", ".join(str(x["batch_size"]) for x in r["rows"]
                             if x["layout"] == "contiguous" and x["pass"] == "eval")
    return (f"{r['model']}: channels_last vs contiguous ({r['rounds']} rounds): {gains}; chosen {r['chosen']} "
            f"(utils.LAYOUTS has {r['table']}{differs}), evaluation batch "
            f"{r['chosen_eval_batch_size']} (least time per example of {eval_batches})")


def evaluation_points(model_name: str, size: EvalSize, s: Settings, device: torch.device,
                      digits: tuple | None) -> tuple[nn.Module, float, list, str]:
    """(model, eps, batches, description) that the layout-agreement and side-by-side parts attack: the
    digits cnn of the eval part (digits: (model, eps)) on the digits test points, or a model with random
    weights (seed 0) on random images whose labels are its own predictions (every example attacked)."""
    if model_name == "cnn" and digits is not None:
        model, eps = digits
        split = data.load_split("digits", "", train=False)
        batches = list(data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval,
                                    device=device))
        return model, eps, batches, f"digits test, the cnn of the eval part (eps {DIGITS_EPS}/255)"
    torch.manual_seed(0)
    shape = INPUT_SHAPES[model_name]
    model = utils.to_device(models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn),
                            device).eval()
    x = torch.rand(size.n_eval, *shape, device=device)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(1) for part in x.split(size.batch_size)])
    batches = list(zip(x.split(size.batch_size), y.split(size.batch_size)))
    return model, BENCH_EPS / 255, batches, "random images whose labels are the untrained model's predictions (seed 0)"


def bench_layout_agreement(model_name: str, s: Settings, device: torch.device, digits: tuple | None) -> dict:
    """The final evaluation (utils.seeded_robust_accuracy, eval mode, fp32, seed 0) of the same weights on the
    same points in both layouts, compared example by example: a different layout may change a verdict only
    through float rounding. cnn: the digits cnn of the eval part on the digits test points; other models:
    random weights (seed 0), random images labelled by the model's own predictions (every example attacked)."""
    size = s.agreement[model_name]
    model, eps, batches, points = evaluation_points(model_name, size, s, device, digits)
    results, seconds = {}, {}
    for cl in (False, True):
        twin = utils.set_layout(copy.deepcopy(model).float().eval(), cl)
        synchronize(device)
        start = time.perf_counter()
        results[cl] = utils.seeded_robust_accuracy(twin, batches, eps, size.n_iters, size.n_restarts, seed=0)
        synchronize(device)
        seconds[cl] = time.perf_counter() - start
    n = results[False].n_eval
    differ = int((results[False].robust != results[True].robust).sum())
    names = {False: "contiguous", True: "channels_last"}
    return {"model": model_name, "points": points, **asdict(size), "eps": eps,
            "attack": f"PGD-{size.n_iters}-{size.n_restarts}", "verdicts_differ": differ,
            "allowed": max(1, n // 1000), "within_rounding": differ <= max(1, n // 1000),
            **{f"{k}_{names[cl]}": v for cl, r in results.items()
               for k, v in (("clean_acc", r.clean_acc), ("robust_acc", r.pgd_acc),
                            ("passes_per_example", r.grad_passes / n), ("seconds", seconds[cl]))}}


def format_layout_agreement(r: dict) -> str:
    return (f"{r['model']}: {r['attack']} on {r['n_eval']} points ({r['points']}, batch {r['batch_size']}), "
            f"contiguous vs channels_last: {r['verdicts_differ']} verdicts differ (allowed {r['allowed']}); robust "
            f"acc {r['robust_acc_contiguous']:.4f} vs {r['robust_acc_channels_last']:.4f}, clean acc "
            f"{r['clean_acc_contiguous']:.4f} vs {r['clean_acc_channels_last']:.4f}, passes per example "
            f"{r['passes_per_example_contiguous']:.2f} vs {r['passes_per_example_channels_last']:.2f}, "
            f"{r['seconds_contiguous']:.1f} s vs {r['seconds_channels_last']:.1f} s")


# ---------------------------------------------------------------------------- the authors' versions
def _bounded(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """min then max against one-element tensors built on each call: the authors' clamp, which costs two
    element-wise passes and two small allocations where torch.clamp costs one pass."""
    return torch.max(torch.min(t, torch.full((1,), high, device=t.device)), torch.full((1,), low, device=t.device))


def reference_pgd_accuracy(model: nn.Module, batches, eps: float, n_iters: int, n_restarts: int) -> float:
    """The authors' final evaluation (their utils.attack_pgd inside utils.rob_acc, fp32), restated with
    the same work per step, so that its time is theirs:
    - each restart attacks every example of the batch from a U[-eps, eps] start (drawn into a zero tensor,
      so the draws equal ours and utils.seeded_robust_accuracy's for the same seed);
    - a step is a forward at x + delta, the batch-mean cross-entropy and loss.backward(), which also
      computes and accumulates every weight's gradient (the weights keep requires_grad in their code),
      then delta + eps/4 * sign(gradient), the box and then the eps-ball through min/max clamps, and the
      gradient zeroed: n_iters x n_restarts forward+backward passes per example, no early exit;
    - after each restart a forward without a graph, the per-example cross-entropy, and the restart kept
      where it is at least the best so far (a later restart wins a tie), through boolean masks;
    - per batch: the kept delta projected onto the box, its corner version sign-projected (computed and
      kept for their analyses), a forward, the loss and the correct count read on the host, and both
      deltas copied to host memory; all of them stacked at the end.
    Returns the robust accuracy. The model in eval mode; the caller leaves requires_grad on its weights."""
    alpha, correct, total, kept_deltas = utils.eval_alpha(eps), 0, 0, []
    for x, y in batches:
        best_loss, best = torch.zeros(len(y), device=x.device), torch.zeros_like(x)
        for _ in range(n_restarts):
            delta = torch.zeros_like(x).uniform_(-eps, eps).requires_grad_(True)
            for _ in range(n_iters):
                F.cross_entropy(model(x + delta), y).backward()
                with torch.no_grad():
                    moved = _bounded(x + (delta + alpha * torch.sign(delta.grad)), 0.0, 1.0) - x
                    delta.copy_(_bounded(moved, -eps, eps))
                delta.grad.zero_()
            with torch.no_grad():
                loss = F.cross_entropy(model(x + delta), y, reduction="none")
                higher = loss >= best_loss
                best[higher] = delta.detach()[higher]
                best_loss = torch.max(best_loss, loss)
        best = _bounded(x + best, 0.0, 1.0) - x
        corner = _bounded(x + eps * torch.sign(best), 0.0, 1.0) - x
        with torch.no_grad():
            logits = model(x + best)
            loss = F.cross_entropy(logits, y)
        correct += (logits.max(1)[1] == y).sum().item()
        loss.item()
        total += len(y)
        kept_deltas += [best.cpu().numpy(), corner.cpu().numpy()]
    np.vstack(kept_deltas)  # their rob_acc returns the stacked deltas
    return correct / total


def reference_gradalign_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float,
                             fgsm_alpha: float) -> Callable[[], torch.Tensor]:
    """The authors' FGSM + GradAlign training step (zero start; their train.py's loop body, fp32), restated
    with the same work: the FGSM gradient at the start clamped to the box by min/max, computed with
    create_graph (as their code does whenever GradAlign is on) and only then detached; the step
    fgsm_alpha * eps * sign, clipped to the eps-ball and then the box; the training loss at x + delta;
    grad2, the input gradient of the batch-mean cross-entropy at x + eta (eta ~ U[-eps, eps], not
    clamped), with its graph; the cosine over the examples whose two gradients both have a nonzero norm
    (a boolean selection, which waits for the device); loss + lam * (1 - mean cos), backward, optimiser
    step; then the statistics their loop logs, each read on the host at every step: the loss, the
    regulariser, the correct count, the summed input-gradient norms and the summed L2 norms of the
    box-projected perturbation. Train mode."""
    def call() -> torch.Tensor:
        model.train()
        delta = torch.zeros_like(x, requires_grad=True)
        attack_loss = F.cross_entropy(model(_bounded(x + delta, 0.0, 1.0)), y)
        grad1 = torch.autograd.grad(attack_loss, delta, create_graph=True)[0].detach()
        with torch.no_grad():
            delta = _bounded(delta + fgsm_alpha * (eps * torch.sign(grad1)), -eps, eps)
            delta = _bounded(x + delta, 0.0, 1.0) - x
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y)
        reg = torch.zeros(1, device=x.device)[0]
        eta = torch.zeros_like(x).uniform_(-eps, eps).requires_grad_(True)
        grad2 = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta, create_graph=True)[0]
        norms1, norms2 = (grad1 ** 2).sum([1, 2, 3]) ** 0.5, (grad2 ** 2).sum([1, 2, 3]) ** 0.5
        both = (norms1 != 0) * (norms2 != 0)
        g1, g2 = grad1[both], grad2[both]
        unit1 = g1 / ((g1 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
        unit2 = g2 / ((g2 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
        reg = reg + lam * (1.0 - (unit1 * unit2).sum((1, 2, 3)).mean())
        total = loss + reg
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():  # the logged statistics, each read on the host
            final = _bounded(x + delta, 0.0, 1.0) - x
            logged = [total.item(), reg.item(), (logits.max(1)[1] == y).sum().item(),
                      ((grad1 ** 2).sum([1, 2, 3]) ** 0.5).sum().item(),
                      ((final ** 2).sum([1, 2, 3]) ** 0.5).sum().item()]
        return torch.tensor(logged[0])
    return call


@dataclass(frozen=True)
class RunPoints:
    """A finished run's model and the points, attack, seed and layout of its final evaluation (load_run_points)."""
    model: nn.Module
    model_name: str
    eps: float                      # in [0, 1] units
    batches: list
    size: EvalSize
    seed: int
    channels_last: str              # the run's --channels_last
    final_robust_acc: float | None  # final.json's PGD accuracy of the last weights
    description: str


def load_run_points(run_dir: str, device: torch.device) -> RunPoints:
    """The last weights of a finished train.py run (architecture, normalisation and eps from its config.json,
    read as eval.py reads them) and the points and attack of its final evaluation (final.json's n_eval,
    attack_iters and n_restarts; its first test points in batches of its batch_size_eval; its seed), so
    that ours repeats final.json's robust accuracy. Raises ValueError, models.CheckpointError or
    data.DataMissingError with a one-line message."""
    path = os.path.join(run_dir, "model.pth")
    args = evaluation.fill_from_run(evaluation.build_parser().parse_args(["--model_path", path]), path)
    run_config, final = (rundir.read_json(os.path.join(run_dir, f)) for f in ("config.json", "final.json"))
    counts = ("n_eval", "attack_iters", "n_restarts")
    if (not isinstance(final, dict) or not isinstance(final.get("last"), dict)
            or not all(isinstance(final.get(k), int) and final[k] >= 0 for k in counts)):
        raise ValueError(f"--run {run_dir}: final.json is damaged or not train.py's; evaluate the run again "
                         "(python eval.py --model_path RUN_DIR/model.pth) or give another run")
    info = data.DATASETS[args.dataset]
    model = models.build_model(args.model, info.n_classes, info.shape, args.n_layers, args.n_filters_cnn,
                               args.normalize)
    models.load_state(model, models.read_checkpoint(path, "last"))
    split = data.load_split(args.dataset, run_config.get("data_dir", args.data_dir), train=False)
    size = EvalSize(final["n_eval"], run_config.get("batch_size_eval", config.defaults()["batch_size_eval"]),
                    final["attack_iters"], final["n_restarts"])
    batches = list(data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval,
                                device=device))
    name = os.path.basename(os.path.normpath(run_dir))
    return RunPoints(model=utils.to_device(model, device).eval(), eps=args.eps / 255, batches=batches, size=size,
                     seed=run_config.get("seed", 0), final_robust_acc=final["last"].get("pgd_acc"),
                     channels_last=run_config.get("channels_last", "auto"),
                     model_name=args.model, description=f"{args.dataset} test, the last weights of {name}")


def load_authors_code(folder: str) -> types.ModuleType:
    """The authors' utils.py from a checkout of their repository, imported as a module (nothing of it is kept
    in this repository). It imports apex.amp at the top, which only its fp16 path calls: where apex is not
    installed, an empty stand-in takes its place while the file is imported. Raises ValueError (one line)
    when the file has no rob_acc."""
    stand_in = importlib.util.find_spec("apex") is None
    if stand_in:
        apex = types.ModuleType("apex")
        apex.amp = types.ModuleType("apex.amp")
        sys.modules.update({"apex": apex, "apex.amp": apex.amp})
    try:
        spec = importlib.util.spec_from_file_location("authors_utils", os.path.join(folder, "utils.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # whatever their file raises on import, in one line
        raise ValueError(f"--authors_code {folder}: importing its utils.py failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        if stand_in:
            sys.modules.pop("apex", None)
            sys.modules.pop("apex.amp", None)
    if not callable(getattr(module, "rob_acc", None)):
        raise ValueError(f"--authors_code {folder}: its utils.py has no rob_acc; give a checkout of "
                         "github.com/tml-epfl/understanding-fast-adv-training")
    return module


def bench_reference(model_name: str, s: Settings, device: torch.device, digits: tuple | None,
                    deadline: float = math.inf, run_points: RunPoints | None = None,
                    authors: types.ModuleType | None = None) -> dict:
    """Ours beside the authors' (restated above), timed in interleaved rounds on the same model and points:
    the final evaluation's PGD (utils.seeded_robust_accuracy in the evaluation layout, against
    reference_pgd_accuracy with contiguous weights) and the FGSM+GradAlign training step (train.train_step
    in the training layout, against reference_gradalign_step with contiguous weights; each on its own copy
    of the same weights). Speedups are medians of the per-round ratio (authors' time / ours).
    run_points: attack that run's model and points instead (load_run_points). authors: the authors' utils module
    (load_authors_code), whose rob_acc is timed too, on its own copy of the weights."""
    seed = 0
    if run_points is not None:
        size, model, eps, seed = run_points.size, run_points.model, run_points.eps, run_points.seed
        batches, points = run_points.batches, run_points.description
    else:
        size = s.evals[model_name]
        model, eps, batches, points = evaluation_points(model_name, size, s, device, digits)
    layouts = utils.pass_layouts(run_points.channels_last if run_points else "auto", device.type, model_name)
    ours_model = utils.set_layout(copy.deepcopy(model).float().eval(), layouts["eval"])
    theirs_model = utils.set_layout(copy.deepcopy(model).float().eval(), False).requires_grad_(True)
    accs = {}

    def ours():
        accs["ours"] = utils.seeded_robust_accuracy(ours_model, batches, eps, size.n_iters, size.n_restarts,
                                                    seed).pgd_acc

    def theirs():
        torch.manual_seed(seed)
        accs["theirs"] = reference_pgd_accuracy(theirs_model, batches, eps, size.n_iters, size.n_restarts)

    # the training step, on the bench's training batch
    shape, batch = INPUT_SHAPES[model_name], s.batch_sizes[model_name]
    xb, yb = synthetic_batch(shape, batch, device)
    cfg = method_config(model_name, "gradalign", batch, s.device, half_prec=s.half_prec, extra=_cnn_flags(s))
    pair = layout_pair(model_name, s, device)
    ours_train = pair[layouts["train"]]
    theirs_train = copy.deepcopy(pair[False])
    opts = []
    for m in (ours_train, theirs_train):
        opts.append(train.make_optimizer(cfg, m))
        opts[-1].param_groups[0]["lr"] = BENCH_LR
    fns = {"pgd_ours": ours, "pgd_theirs": theirs}
    if authors is not None:
        authors_model = copy.deepcopy(theirs_model)

        def authors_code():
            torch.manual_seed(seed)
            accs["authors_code"] = authors.rob_acc(batches, authors_model, eps, utils.eval_alpha(eps), None, False,
                                                   size.n_iters, size.n_restarts, cuda=device.type == "cuda")[0]
        fns["pgd_authors_code"] = authors_code
    steps = {"gradalign_ours": training_step(ours_train.train(), opts[0], make_scaler(cfg, device), xb, yb, cfg,
                                             device),
             "gradalign_theirs": reference_gradalign_step(theirs_train, opts[1], xb, yb, cfg.eps_frac,
                                                          cfg.grad_align_cos_lambda, cfg.fgsm_alpha)}
    # the evaluations and the steps timed apart: a step's few milliseconds are not timed next to seconds of PGD
    halfway = (time.perf_counter() + deadline) / 2 if deadline < math.inf else deadline
    samples = time_interleaved(fns, device, s, halfway)
    samples |= time_interleaved(steps, device, s, deadline)
    ratio = {k: statistics.median(t / o for t, o in zip(samples[f"{k}_theirs"], samples[f"{k}_ours"]))
             for k in ("pgd", "gradalign")}
    code = {} if run_points is None else {"robust_acc_final_json": run_points.final_robust_acc}
    if authors is not None:
        code |= {"robust_acc_authors_code": accs["authors_code"],
                 "restatement_agrees": accs["authors_code"] == accs["theirs"],
                 "pgd_s_authors_code": statistics.median(samples["pgd_authors_code"]),
                 "pgd_speedup_authors_code": statistics.median(
                     t / o for t, o in zip(samples["pgd_authors_code"], samples["pgd_ours"]))}
    return {"model": model_name, "points": points, "seed": seed, **code, **asdict(size), "eps": eps,
            "layouts": utils.layout_names(layouts),
            "rounds": len(samples["pgd_ours"]), "step_rounds": len(samples["gradalign_ours"]),
            "robust_acc_ours": accs["ours"], "robust_acc_theirs": accs["theirs"],
            "pgd_s_ours": statistics.median(samples["pgd_ours"]),
            "pgd_s_theirs": statistics.median(samples["pgd_theirs"]),
            "pgd_speedup": ratio["pgd"], "gradalign_batch_size": batch,
            "gradalign_ms_ours": 1e3 * statistics.median(samples["gradalign_ours"]),
            "gradalign_ms_theirs": 1e3 * statistics.median(samples["gradalign_theirs"]),
            "gradalign_speedup": ratio["gradalign"],
            "samples_s": {k: v for k, v in samples.items()}}


def format_reference(r: dict) -> str:
    return (f"{r['model']}: PGD-{r['n_iters']}-{r['n_restarts']} on {r['n_eval']} points ({r['points']}, batch "
            f"{r['batch_size']}): ours {r['pgd_s_ours']:.2f} s, the authors' {r['pgd_s_theirs']:.2f} s: "
            f"{r['pgd_speedup']:.2f}x faster at robust acc {r['robust_acc_ours']:.3f} (theirs "
            f"{r['robust_acc_theirs']:.3f}); FGSM+GradAlign step (batch {r['gradalign_batch_size']}): ours "
            f"{r['gradalign_ms_ours']:.1f} ms, theirs {r['gradalign_ms_theirs']:.1f} ms: "
            f"{r['gradalign_speedup']:.2f}x ({r['rounds']} rounds, layouts {r['layouts']})"
            + (f"; the authors' own rob_acc {r['pgd_s_authors_code']:.2f} s ({r['pgd_speedup_authors_code']:.2f}x), "
               f"robust acc {r['robust_acc_authors_code']:.3f}: the restatement "
               f"{'agrees' if r['restatement_agrees'] else 'DISAGREES'}" if "pgd_s_authors_code" in r else ""))


# ------------------------------------------------------------------------------------------ output
def format_steps(results: dict, cuda: bool) -> str:
    header = f"{'model':9} {'method':22} {'units/step':>10} {'ms/step':>9} {'passes':>7}"
    header += f" {'peak MiB':>9}" if cuda else ""
    lines = [header, "-" * len(header)]
    for model_name, r in results.items():
        line = f"{model_name:9} {'fwd+bwd unit':22} {1.0:10.2f} {r['unit_ms']:9.1f} {'1':>7}"
        lines.append(line + (f" {r['unit_peak_mib']:9.0f}" if cuda else ""))
        for m in r["methods"].values():
            line = f"{model_name:9} {m['label']:22} {m['units']:10.2f} {m['ms']:9.1f} {m['passes']:>7}"
            lines.append(line + (f" {m['peak_mib']:9.0f}" if cuda else ""))
    return "\n".join(lines)


def format_eval(model_name: str, e: dict) -> str:
    text = (f"{model_name}: {e['attack']} on {e['n_eval']} points ({e['data']}): {e['images_per_s']:.1f} images/s, "
            f"{e['passes_per_example']:.1f} fwd+bwd passes per example (reference {e['reference_passes_per_example']}, "
            f"floor {e['floor_passes_per_example']:.1f} = {e['reference_passes_per_example']} x robust acc "
            f"{e['robust_acc']:.3f}: an example that stays robust needs every pass), clean acc {e['clean_acc']:.3f}; "
            f"{e['images_per_s_without_early_exit']:.1f} images/s if every example took every pass")
    if e["peak_mib"] is not None:
        text += (f"; peak {e['peak_mib']:.0f} MiB; {e['distinct_batch_sizes']} distinct batch sizes "
                 f"(cudnn.benchmark {e['cudnn_benchmark']}: each new size is autotuned)")
    if "autoattack" in e:
        a = e["autoattack"]
        stages = ", ".join(f"{name} {acc:.3f}" for name, acc in a["stage_acc"].items())
        text += (f"\n{model_name}: AutoAttack ({a['attack_version']}, {a['attack_library']}) on the same points: "
                 f"{a['images_per_s']:.1f} images/s, {a['grad_passes_per_example']:.1f} fwd+bwd and "
                 f"{a['forward_passes_per_example']:.1f} forward-only passes per example, robust acc after {stages}")
    return text


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of all CPU time that other processes used over `seconds` (Linux /proc/stat; else None)."""
    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        before = read()
        time.sleep(seconds)
        after = read()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return 1.0 - idle / max(sum(delta), 1)


def environment(device: torch.device) -> dict:
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_busy_at_start": cpu_busy_fraction()}


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    try:  # what --run and --authors_code name, read before any timing
        points = load_run_points(s.run, torch.device(s.device)) if s.run else None
        authors = load_authors_code(s.authors_code) if s.authors_code else None
    except (ValueError, models.CheckpointError, data.DataMissingError) as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    threads = torch.get_num_threads()
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    try:
        run(s, points, authors)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
    return 0


def run(s: Settings, points: RunPoints | None = None, authors: types.ModuleType | None = None) -> None:
    device = torch.device(s.device)
    start = time.perf_counter()
    env = environment(device)
    busy = env["cpu_busy_at_start"]
    if device.type == "cpu" and busy is not None and busy > 0.2:
        print(f"note: other processes used {busy:.0%} of the {env['cpu_count']} cores before the start: times are "
              "inflated and noisy (the functions are timed in turn, which limits the bias of the ratios)")
    timed = [p for p in s.parts if p in ("steps", "layouts", "reference")]
    # The budget, less a reserve for the evaluations, is shared by the timed parts and models still to time.
    steps_end = start + s.budget_s - EVAL_RESERVE_S if s.budget_s > 0 else math.inf
    jobs = [(part, m) for part in timed for m in ([points.model_name] if points and part == "reference" else s.models)]

    def deadline(done: int) -> float:
        return time.perf_counter() + (steps_end - time.perf_counter()) / (len(jobs) - done)
    report: dict = {**env, "settings": asdict(s), "reference": REFERENCE}
    done = 0
    if "steps" in s.parts:
        steps = report["steps"] = {}
        for model_name in s.models:
            steps[model_name] = bench_steps(model_name, s, device, deadline(done))
            done += 1
        sizes = ", ".join(f"{m} {r['batch_size']}" for m, r in steps.items())
        print(f"training step cost on {env['device_name']} (torch {env['torch']}, {torch.get_num_threads()} threads, "
              f"{'mixed' if s.half_prec else 'fp32'} precision; batch sizes {sizes}; unit = one forward+backward of "
              "the same batch; passes = the step's forward+backward passes: attack + monitoring pass at x (f: forward "
              "only) + training, dbl = GradAlign's double backprop; Free-AT: per iteration)")
        print(format_steps(steps, device.type == "cuda"))
        for model_name, r in steps.items():
            rounds = (f"{r['rounds']} timed round(s)"
                      + (f" of {s.repeats} (time budget)" if r["rounds"] < s.repeats else ""))
            print(f"{model_name}: {rounds}; settings {r['settings']}")
    if "layouts" in s.parts:
        report["layouts"] = {}
        for model_name in s.models:
            report["layouts"][model_name] = r = bench_layouts(model_name, s, device, deadline(done))
            done += 1
            print(format_layouts(r))
    needs_digits = {"eval", "layout_agreement"} | (set() if points else {"reference"})
    digits = train_digits_cnn(s, device) if "cnn" in s.models and needs_digits & set(s.parts) else None
    if "eval" in s.parts:
        report["eval"] = {}
        for model_name in s.models:
            report["eval"][model_name] = bench_eval(model_name, s, device, digits if model_name == "cnn" else None)
            print(format_eval(model_name, report["eval"][model_name]))
    if "reference" in s.parts:
        report["versus_reference"] = {}
        for model_name in [points.model_name] if points else s.models:
            r = bench_reference(model_name, s, device, digits[:2] if model_name == "cnn" and digits else None,
                                deadline(done), run_points=points, authors=authors)
            done += 1
            report["versus_reference"][model_name] = r
            print(format_reference(r))
    if "layout_agreement" in s.parts:
        report["layout_agreement"] = {}
        for model_name in s.models:
            r = report["layout_agreement"][model_name] = bench_layout_agreement(
                model_name, s, device, digits[:2] if model_name == "cnn" else None)
            print(format_layout_agreement(r))
    report["wall_seconds"] = time.perf_counter() - start
    rundir.atomic_write_json(s.out, report)
    print(f"wrote {s.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
