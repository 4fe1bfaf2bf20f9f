"""What the measuring tools share (bench.py, authors_compare.py, gpu_check.py): their common flags and
sizes, timed calls in interleaved rounds, the device's clock and peak memory, the machine's
description, and the models, batches and train.py configs of the recipes they time. Nothing runs at
import; no tool imports another.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import config
import data
import methods
import models
import precision
import train

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
                "wrn28_10": (3, 32, 32), "resnet18_nfgsm": (3, 32, 32), "resnet18_rice": (3, 32, 32),
                "wrn28_10_nfgsm": (3, 32, 32)}
# The models timed at the sizes of another (the later methods' authors' networks, at their family's).
SIZED_AS = {"cnn_bn": "cnn", "resnet18_nfgsm": "resnet18", "resnet18_rice": "resnet18", "wrn28_10_nfgsm": "wrn28_10"}
N_CLASSES = 10
BENCH_LR = 1e-4  # learning rate of the timed steps: small, so repeated updates keep the weights finite

# The digits cnn that the evaluation attacks: ~50% PGD-50-10 accuracy after a few seconds of training.
DIGITS_EPS = 48  # 1/255 units
DIGITS_TRAIN = ["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "16", "--attack", "pgd",
                "--attack_init", "random", "--pgd_train_n_iters", "5", "--pgd_alpha_train", "20",
                "--eps", str(DIGITS_EPS), "--clamp_grad", "half", "--lr_max", "0.01", "--debug"]
MAX_REPEATS = 1000  # --repeats: more rounds than this would take hours for resnet18 and tell nothing new


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
    parts: tuple[str, ...] = ()     # what to measure (bench.py's --parts)
    eval_batch_candidates: dict[str, tuple[int, ...]] | None = None  # evaluation batch sizes tried per model
    agreement: dict[str, EvalSize] | None = None  # the final evaluation run in both layouts (layout_agreement)

def add_flags(p: argparse.ArgumentParser, out_default: str) -> None:
    """The flags every measuring tool takes: device, models, sizes, rounds, time budget, precision,
    threads and the output file."""
    a = p.add_argument
    a("--device", default="auto", help="auto (cuda if available; the default), cpu, cuda or cuda:N")
    a("--models", nargs="+", default=["cnn", "resnet18"], choices=list(INPUT_SHAPES), help="default: cnn resnet18")
    a("--batch_size", type=int, default=None,
      help="training batch of every model (default: cnn 128 / resnet18 32 / wrn28_10 4 on CPU, 512 / 128 / 128 "
           "on CUDA; the later methods' networks as their family's)")
    a("--repeats", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    a("--budget_s", type=float, default=None,
      help="seconds for the whole run, spent mostly on timing rounds: fewer rounds when the machine is slow "
           "or busy (default 150 on CPU, no limit on CUDA or with --quick)")
    a("--half_prec", action="store_true", help="training steps as train.py --half_prec (fp16 autocast on CUDA, "
      "bf16 on CPU); the evaluation stays fp32, as train.py's final one")
    a("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own choice)")
    a("--out", default=out_default, help="where the numbers go")
    a("--quick", action="store_true", help="tiny sizes and one round (for the tests)")
    a("--n_layers", type=int, default=1,
      help="conv layers of cnn and cnn_bn in the timed training steps (as train.py's flag)")
    a("--n_filters_cnn", type=int, default=16,
      help="filters of cnn and cnn_bn in the timed training steps (as train.py's flag)")


def out_problem(path: str) -> str | None:
    """Why the results could not be written to `path` once the timing is done (one line with the fix), or
    None: checked before any timing, so that no measurement is lost."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"--out {path} is a folder; give a file name, e.g. --out {os.path.join(path, 'bench.json')}"
    if not os.path.isdir(folder):
        return f"--out {path}: the folder {folder} does not exist; create it (mkdir -p {folder}) or pick another --out"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {path}: cannot write in {folder} (permission denied); pick another --out"
    return None


def bound_problem(args: argparse.Namespace) -> str | None:
    """The first flag of add_flags outside what a run can use (one line with the fix), or None."""
    cores = os.cpu_count() or 1
    if (args.batch_size is not None and args.batch_size < 1) or (args.repeats is not None and args.repeats < 1):
        return "--batch_size and --repeats must be >= 1"
    if args.repeats is not None and args.repeats > MAX_REPEATS:
        return f"--repeats must be at most {MAX_REPEATS} (got {args.repeats}); --budget_s bounds a run's time"
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        return f"--budget_s must be a finite number of seconds >= 0 (got {args.budget_s:g}; 0: no limit)"
    if not 0 <= args.threads <= cores:
        return f"--threads must be in [0, {cores}], this machine's cores (got {args.threads}; 0: torch's own choice)"
    if args.n_layers < 1 or args.n_filters_cnn < 1:
        return "--n_layers and --n_filters_cnn must be >= 1"
    return out_problem(args.out)


def settings_from(parser: argparse.ArgumentParser, args: argparse.Namespace, parts: tuple[str, ...],
                  autoattack: bool = False) -> Settings:
    """The flags of add_flags resolved for the device: every size the tool uses (parser.error, one line and
    exit 2, for a flag out of bounds). Under --device auto it first prints the device and precision chosen."""
    try:
        device = precision.resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "auto":
        print(precision.device_choice(parser.prog, device, args.half_prec, precision.autocast_dtype(device.type)))
    problem = bound_problem(args)
    if problem:
        parser.error(problem)
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
    for name, like in SIZED_AS.items():
        batch_sizes[name], evals[name], candidates[name] = batch_sizes[like], evals[like], candidates[like]
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
                    autoattack=autoattack,
                    n_layers=args.n_layers, n_filters_cnn=args.n_filters_cnn,
                    parts=parts, eval_batch_candidates=candidates, agreement=agreement)


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


# ------------------------------------------------------------------------- what the tools time
def cnn_flags(s: Settings) -> tuple[str, ...]:
    """The CNN's size as the tool was asked for it, as train.py flags."""
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


def training_step(model: nn.Module, opt, scaler, x, y, cfg: train.Config, device) -> Callable[[], torch.Tensor]:
    """One real train.train_step with the optimiser update; Free-AT's delta persists across calls."""
    state, stats = train.StepState(), train.Stats(device)  # the step creates the method's state

    def call() -> torch.Tensor:
        loss = train.train_step(model, opt, scaler, x, y, cfg, state, stats, update=True)
        state.iteration += 1
        return loss
    return call


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
        pair[cl] = precision.to_device(model, device, channels_last=cl)
    return pair


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
    return precision.to_device(model, device).eval(), cfg.eps_frac, seconds


def evaluation_points(model_name: str, size: EvalSize, s: Settings, device: torch.device,
                      digits: tuple | None) -> tuple[nn.Module, float, list, str]:
    """(model, eps, batches, description) that bench.py's layout-agreement part and authors_compare.py attack:
    the digits cnn of train_digits_cnn (digits: (model, eps)) on the digits test points, or a model with random
    weights (seed 0) on random images whose labels are its own predictions (every example attacked)."""
    if model_name == "cnn" and digits is not None:
        model, eps = digits
        split = data.load_split("digits", "", train=False)
        batches = list(data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval,
                                    device=device))
        return model, eps, batches, f"digits test, the PGD-5-trained digits cnn (eps {DIGITS_EPS}/255)"
    torch.manual_seed(0)
    shape = INPUT_SHAPES[model_name]
    model = precision.to_device(models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn),
                                device).eval()
    x = torch.rand(size.n_eval, *shape, device=device)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(1) for part in x.split(size.batch_size)])
    batches = list(zip(x.split(size.batch_size), y.split(size.batch_size)))
    return model, BENCH_EPS / 255, batches, "random images whose labels are the untrained model's predictions (seed 0)"


# ------------------------------------------------------------------------------------ the machine
@contextlib.contextmanager
def threads(n: int):
    """torch's CPU threads set to n for the block (0: left as they are), restored after it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def note_busy(env: dict) -> None:
    """Prints a note when other processes kept the CPU busy before the start (environment's reading)."""
    busy = env["cpu_busy_at_start"]
    if env["device"] == "cpu" and busy is not None and busy > 0.2:
        print(f"note: other processes used {busy:.0%} of the {env['cpu_count']} cores before the start: times are "
              "inflated and noisy (the functions are timed in turn, which limits the bias of the ratios)")


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
