"""The settings of train.py, each declared once: a Config field whose metadata holds its flag (help,
default, type, choices) and its place in the run name and the report. The parsers of train.py and
eval.py, rundir.py's run name, report.py's comparisons and launch.py are generated from them. Methods
files are loaded here too (load_methods), and the flags each registry entry names are checked against
these declarations (registry_problem).

Every perturbation size on the command line is in 1/255 units of inputs in [0, 1]; Config converts it
once (Config.eps_frac). No torch at import: report.py and launch.py read the declarations too.

A command line may name argument files: `python train.py @recipes/x.args --seed 1` reads the flags
of x.args (several per line, `#` starts a comment); flags after the file override it. An @file inside
an argument file is read from that file's folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import methods

# Exit codes of train.py and eval.py (launch.py reports them in these words).
EXIT_OK, EXIT_IO, EXIT_USAGE, EXIT_LOCKED, EXIT_NONFINITE = 0, 1, 2, 3, 4
EXIT_MEANINGS = {1: "error (see the log)", EXIT_USAGE: "bad input", EXIT_LOCKED: "in progress elsewhere (locked)",
                 EXIT_NONFINITE: "the training loss became NaN or inf"}

# The parts every run name starts with (rundir.run_name writes them in this order; the seed ends it).
LEAD = "a fixed part of every run name"


def flag(default, help: str, *, short: str | None = None, unnamed: str | None = None, lead: bool = False,
         compare: bool = True, type: Callable | None = None, choices=None, action=None,
         record_default: bool = True, minimum: tuple[int, str] | None = None) -> dataclasses.Field:
    """One setting: its flag --<field name> and how the run name and the report treat it.

    default: the parser's default (a zero-argument callable is read when the parser is built).
    short: the run name lists the setting as short+value when it differs from its default;
    unnamed: why the run name leaves it out (no number depends on it); lead: a fixed part of
    every run name. Exactly one of the three. compare=False: runs grouped in a report may differ
    in it. choices: a sequence, or a callable giving one (read from a module that imports torch).
    record_default=False: config.json leaves the setting out while it has its default.
    minimum: (the smallest value the parser takes, why a smaller one measures nothing): every tool
    that declares the flag (train.py, eval.py) refuses a smaller value in one line.
    """
    if (short is not None) + (unnamed is not None) + lead != 1:
        raise ValueError(f"flag '{help}': give exactly one of short=, unnamed=, lead=")
    return dataclasses.field(metadata={
        "default": default, "help": help, "short": short, "unnamed": LEAD if lead else unnamed, "compare": compare,
        "type": type, "choices": choices, "action": action, "record_default": record_default,
        "minimum": minimum})


def _listed(module: str, name: str, sort: bool = False) -> Callable[[], list[str]]:
    """Choices kept in a module that imports torch, read when a parser is built."""
    def read() -> list[str]:
        values = list(getattr(importlib.import_module(module), name))
        return sorted(values) if sort else values
    return read


def _data_dir() -> str:
    return os.environ.get("DATA_DIR", "./data")


@dataclass(frozen=True)
class Config:
    """train.py's command line, frozen; derived values are properties (eps etc. in [0, 1] units).

    Fields that the run name lists when changed come in the run name's order; the authors' flags keep
    their names, defaults and meaning."""
    # --- the fixed parts of the run name: dataset_model_attack_init_eps_lambda_..._seed
    dataset: str = flag("cifar10", "digits is the offline one", lead=True, choices=_listed("data", "DATASETS", True))
    model: str = flag(None, "resnet18: the GradAlign authors' PreAct ResNet-18 (default; under --protocol own the "
                      "method's authors' network: resnet18_nfgsm for N-FGSM, resnet18_rice for ZeroGrad, MultiGrad and "
                      "ELLE); wrn28_10, wrn28_10_nfgsm: the wide networks (--wrn_depth, --wrn_width); cnn, cnn_bn: "
                      "the small CNNs (docs/later_methods.md names each source)", lead=True,
                      choices=_listed("models", "MODELS"))
    attack: str = flag("fgsm", "training attack (Free-AT: fgsm with --minibatch_replay>1; nfgsm: N-FGSM, trains "
                       "outside the eps-ball)", lead=True, choices=methods.ATTACKS)
    attack_init: str = flag("random", "start of FGSM/PGD training", lead=True, choices=("zero", "random"))
    eps: float = flag(8, "L-inf radius in 1/255 units", lead=True, compare=False, type=float)
    grad_align_cos_lambda: float = flag(0.0, "GradAlign's lambda (0: off)", lead=True)
    seed: int = flag(0, "random seed (train.py: weights, data order, random starts; eval.py: PGD's random starts)",
                     lead=True, compare=False)
    # --- named when not the default, in this order
    epochs: int = flag(30, "training epochs (plus the one-iteration epoch 0)", short="ep")
    lr_schedule: str = flag("cyclic", "learning-rate schedule", short="", choices=("cyclic", "piecewise"))
    lr_max: float = flag(0.2, "peak learning rate", short="lr")
    batch_size: int = flag(128, "training batch size", short="bs")
    weight_decay: float = flag(5e-4, "weight decay (SGD) or coupled L2 (Adam)", short="wd")
    fgsm_alpha: float = flag(None, "FGSM step as a multiple of eps (default 1.25; 1.0 for --attack nfgsm, as in "
                             "its paper)", short="fa", type=float)
    minibatch_replay: int = flag(1, "m of Free-AT: each batch is replayed m times", short="mr")
    pgd_train_n_iters: int = flag(10, "PGD steps for --attack pgd training", short="pgdk",
                                  minimum=(1, "0 steps train on clean inputs; the paper uses 2 or 10"))
    pgd_alpha_train: float = flag(2.0, "PGD training step in 1/255 units", short="pgda")
    attack_iters: int = flag(10, "PGD steps of the periodic evaluation", short="ai",
                             minimum=(1, "0 steps make the 'PGD' accuracy the clean one (train.py's early stopping "
                                         "would pick its 'best' weights on it); give the default or more"))
    n_layers: int = flag(1, "conv layers of --model cnn (the authors always used 1)", short="nl")
    n_filters_cnn: int = flag(16, "filters of --model cnn", short="nf")
    wrn_depth: int = flag(28, "depth 6n + 4 of the wide networks (ZeroGrad's WideResNet: 34)", short="wrnd",
                          record_default=False)
    wrn_width: int = flag(10, "width factor of the wide networks", short="wrnw", record_default=False)
    eval_iter_freq: int = flag(200, "iterations between periodic evaluations", short="eif")
    n_eval_every_k_iter: int = flag(256, "size of the periodic-evaluation subsets", short="nek")
    n_final_eval: int = flag(-1, "first test points of the final evaluation (-1: all)", short="nfe", compare=False)
    half_prec: bool = flag(False, "mixed precision for training and periodic evaluation (fp16 + GradScaler on "
                           "CUDA, bf16 on CPU)", short="hp")
    half_prec_dtype: str = flag("auto", "dtype of --half_prec: auto = float16 on CUDA, bfloat16 on CPU; float16 "
                                "always comes with a GradScaler, scaled input gradients and skipped non-finite "
                                "steps (on the CPU too)", short="hpd", choices=_listed("precision", "HALF_PREC_DTYPES"))
    tf32: bool = flag(False, "let CUDA matmuls and convolutions use TF32 (default: IEEE fp32)", short="tf32")
    debug: bool = flag(False, "no log file; final evaluation PGD-10 with 3 restarts", short="debug", compare=False)
    eval_early_stopped_model: bool = flag(False, "also evaluate the early-stopped ('best') weights", short="es",
                                          compare=False)
    clamp_grad: str = flag("zero", "gradient of the box clamp in training attacks at pixels exactly 0 or 1: zero = "
                           "the paper's runs (PyTorch 1.4), half = the authors' code on PyTorch >= 1.10 "
                           "(docs/fidelity.md)", short="clamp-", choices=_listed("utils", "CLAMP_RULES"))
    # the final evaluation draws each PGD restart's random start batch by batch, so the batching decides
    # which start each example gets
    batch_size_eval: int = flag(256, "batch size of the evaluations", short="bse")
    # on CUDA it moves the data generator (shuffling, crops, flips) to the GPU, whose random streams differ
    data_on_device: bool | None = flag(None, "keep the dataset on the GPU and augment there (default: on for CUDA)",
                                       short="dod", action=argparse.BooleanOptionalAction)
    # successor methods and GradAlign variants (docs/methods.md, docs/later_methods.md)
    nfgsm_noise_mult: float = flag(2.0, "N-FGSM: the start noise is U[-k eps, k eps], k = this (the paper's k = 2)",
                                   short="nk")
    zerograd_q: float = flag(0.0, "ZeroGrad: zero this fraction (the smallest |values|) of each example's FGSM "
                             "gradient before the sign (0: off; the paper's 0.35); needs --attack fgsm", short="zq")
    multigrad_samples: int = flag(0, "MultiGrad: input gradients at this many random starts vote on each "
                                  "coordinate's sign (0: off; the paper's 3); needs --attack fgsm", short="mgs",
                                  record_default=False)
    multigrad_agree: int = flag(-1, "MultiGrad: how many of the s samples' signs must agree for a coordinate to "
                                "move (its authors' threshold t: it moves where |sum of the s signs| >= 2t - s; -1: "
                                "t = s, all of them, the paper's)", short="mga", record_default=False)
    elle_lambda: float = flag(0.0, "ELLE's lambda on the local-linearity error (0: off); with --elle_adaptive it is "
                              "ELLE-A's lambda_max", short="elle")
    elle_adaptive: bool = flag(False, "ELLE-A: lambda starts at 0, jumps to --elle_lambda when the error spikes, "
                               "decays by 0.99 otherwise", short="ellea")
    grad_align_grad1: str = flag("auto", "GradAlign: backprop through the first gradient too (graph) or not "
                                 "(detached); auto = detached for fgsm/nfgsm (the FGSM gradient is reused), graph for "
                                 "the other attacks (as the authors' code)", short="g1",
                                 choices=("auto", "detached", "graph"))
    grad_align_every: int = flag(1, "GradAlign: apply the regulariser every k-th iteration only", short="gaev")
    grad_align_fd: float = flag(0.0, "GradAlign: finite-difference step h (in [0, 1] input units) replacing double "
                                "backprop (0: exact)", short="gafd")
    method: str | None = flag(None, "a method of methods.py's registry by name (default: the one the flags select); "
                              "for a method registered without flags of its own", short="",
                              choices=lambda: list(methods.REGISTRY), record_default=False)
    methods_file: str | None = flag(None, "a Python file that registers methods (methods.register), imported before "
                                    "the other flags are read; config.json records its path and sha256",
                                    type=os.path.abspath, compare=False, record_default=False,
                                    unnamed="where methods come from: the method's name is in the run name, the "
                                    "file's sha256 in config.json")
    # the training protocol (methods.Protocol): this paper's by default; --protocol own fills in the unset
    # ones below from the method's paper's official scripts (docs/later_methods.md)
    lr_peak: float = flag(None, "cyclic schedule: the learning rate peaks after floor(lr_peak * epochs) epochs "
                          "(default 0.4, this paper's 2/5; the later methods' own protocols 0.5 on CIFAR)",
                          short="peak", type=float, record_default=False)
    normalize: str = flag(None, "input normalisation inside the model, per channel (default none, this paper's; "
                          "the CIFAR statistics for N-FGSM and ZeroGrad under their own protocols)", short="norm",
                          choices=_listed("models", "NORMALIZATIONS"), record_default=False)
    augment: str = flag(None, "training augmentation: dataset = the dataset's crop and flips (default, this paper's); "
                        "reflect = a reflect-padded crop and flips, rotate = the crop and flips then a rotation of "
                        "U[-15, 15] degrees, none (ZeroGrad's CIFAR-10, CIFAR-100 and SVHN under its own protocol)",
                        short="aug", choices=_listed("data", "AUGMENTATIONS"), record_default=False)
    clean_forward: bool = flag(None, "end each training step with a clean forward in train mode (BatchNorm "
                               "statistics only), as ELLE's code (default: off, or the protocol's)", short="cleanfwd",
                               action=argparse.BooleanOptionalAction, record_default=False)
    protocol: str = flag("paper", "paper: this paper's protocol (the settings above as given, default 0.4 / none / "
                         "off); own: the method's own paper's (methods.py's Protocol: the peak, fp32, the "
                         "normalisation, a last clean forward) for the settings not given; the same as paper for "
                         "this paper's methods", short="proto", choices=methods.PROTOCOLS, record_default=False)
    # the memory layout: speed, but another layout rounds differently, so on/off are named (clon, cloff);
    # auto's layouts (per device type) are recorded in config.json and resume.pt, and a resume that would
    # change them is refused
    channels_last: str = flag("auto", "channels_last weights: auto = per pass (training, evaluation) as bench.py "
                              "measured them (precision.LAYOUTS); on/off: every pass. Speed only, but another layout "
                              "rounds differently", short="cl", compare=False,
                              choices=_listed("precision", "LAYOUT_CHOICES"))
    # --- where files are, what to do with them, which machine: no number depends on these
    gpu: int = flag(0, "which GPU: same as --device cuda:N", unnamed="which card of a machine", compare=False)
    # cpu and cuda draw other random numbers and round differently, as two GPU models round differently,
    # which no name could tell apart; config.json records device_used. The name must also be known before
    # the device is: launch.py --status runs on a login node, a requeued job lands on any node.
    device: str = flag("auto", "auto, cpu, cuda or cuda:N", compare=False,
                       unnamed="the hardware, recorded as device_used in config.json")
    # the CPU thread count changes how sums are split, so results agree across counts only to rounding
    threads: int | None = flag(None, "torch's CPU threads (intra-op; default: torch's own choice, which "
                               "OMP_NUM_THREADS sets); config.json records the count used", type=int, compare=False,
                               unnamed="the CPU thread count: rounding only, recorded under numerics in config.json",
                               record_default=False)
    data_dir: str = flag(_data_dir, "dataset folder (env DATA_DIR)", unnamed="where the dataset is read from",
                         compare=False)
    download: bool = flag(False, "download missing datasets through torchvision", compare=False,
                          unnamed="fetches missing files, then reads the same")
    out_dir: str = flag("runs", "parent folder of the run directories", unnamed="where the run directory goes",
                        compare=False)
    overwrite: bool = flag(False, "retrain even if the run has finished", unnamed="whether a finished run is retrained",
                           compare=False)
    final_autoattack: bool = flag(False, "final.json also gets standard AutoAttack accuracy (optional extra: "
                                  "requirements-aa.txt)", compare=False,
                                  unnamed="adds AutoAttack to final.json; training and the PGD numbers are the same")
    log_to: str | None = flag(None, "also stream metrics.jsonl's rows and the final numbers to TensorBoard "
                              "(run_dir/tensorboard) or W&B (offline unless WANDB_MODE says otherwise; optional "
                              "extra: requirements-log.txt)", compare=False, choices=("tensorboard", "wandb"),
                              unnamed="a copy of metrics.jsonl for a dashboard", record_default=False)
    fname: str = flag("plain_cifar10", "unused, kept for the authors' scripts", unnamed="unused", compare=False)

    @property
    def eps_frac(self) -> float:
        return self.eps / 255

    @property
    def pgd_alpha_eval(self) -> float:
        """Step of every evaluation PGD (utils.eval_alpha)."""
        import utils
        return utils.eval_alpha(self.eps_frac)

    @property
    def pgd_alpha_train_frac(self) -> float:
        return self.pgd_alpha_train / 255

    @property
    def final_attack(self) -> tuple[int, int]:
        """(PGD steps, restarts) of the final evaluation: 50x10, or 10x3 with --debug."""
        return (10, 3) if self.debug else (50, 10)


FIELDS = {f.name: f.metadata for f in dataclasses.fields(Config)}
# Fields that fill in a flag left unset (None), before the method's own defaults (methods.py) and the
# protocol's settings (--protocol own).
UNSET = {"fgsm_alpha": 1.25, **methods.PAPER.settings()}


def _default(name: str):
    value = FIELDS[name]["default"]
    return value() if callable(value) else value


# ------------------------------------------------------------------------------------------ parsers
def arg_file_words(line: str) -> list[str]:
    """The words of one line of an argument file: shell quoting, `#` starts a comment."""
    return shlex.split(line, comments=True)


def read_arg_files(words: list[str], chain: tuple[str, ...] = ()) -> list[str]:
    """words with each @FILE replaced by the words of FILE (arg_file_words per line), recursively. A
    relative @FILE inside an argument file is read from that file's folder (so a recipe works from any
    working directory); one on the command line, from the working directory. chain: the files that
    named this one. Raises ValueError (one line naming the file, the files that led there and the fix)."""
    out = []
    for word in words:
        if not word.startswith("@"):
            out.append(word)
            continue
        path = word[1:]
        if chain and not os.path.isabs(path):
            path = os.path.join(os.path.dirname(chain[-1]), path)
        named = "".join(f", named in {parent}" for parent in reversed(chain))
        if os.path.realpath(path) in map(os.path.realpath, chain):
            raise ValueError(f"the argument files name each other in a loop ({' -> '.join((*chain, path))}); "
                             "remove the loop")
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            hint = " (an @file inside an argument file is read from that file's folder)" if chain else ""
            raise ValueError(f"cannot read the argument file {path} ({getattr(exc, 'strerror', None) or exc})"
                             f"{named}; check the path{hint}") from None
        try:
            inner = [w for line in lines for w in arg_file_words(line)]
        except ValueError as exc:
            raise ValueError(f"the argument file {path}{named}: {str(exc).lower()}; fix its quoting") from None
        out += read_arg_files(inner, (*chain, path))
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with code 2, and reads
    argument files (@file, read_arg_files: several flags per line, `#` comments, nested files relative
    to the file that names them)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        try:
            words = read_arg_files(sys.argv[1:] if args is None else list(args))
        except ValueError as exc:
            self.error(str(exc))
        return super().parse_known_args(words, namespace)


def add_flags(p: argparse.ArgumentParser, names, *, from_run: tuple[str, ...] = (), defaults: dict | None = None,
              helps: dict | None = None) -> None:
    """Adds the flags of these Config fields to p, as Config declares them. from_run: fields whose flag
    defaults to None (eval.py then reads them from the run's config.json); defaults, helps: another
    default or help text for this tool."""
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        meta = FIELDS[name]
        default = defaults.get(name, _default(name))
        help_text = helps.get(name, meta["help"])
        if name in from_run:
            help_text += f" (default: the run's config.json, else {default})"
            default = None
        kwargs = {"default": default, "help": help_text}
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
        elif isinstance(_default(name), bool):
            kwargs["action"] = "store_true"
        elif meta["type"] is not None or isinstance(_default(name), (int, float)):
            kwargs["type"] = meta["type"] or type(_default(name))
            if meta["minimum"] is not None:
                kwargs["type"] = at_least(kwargs["type"], *meta["minimum"])
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        p.add_argument(f"--{name}", **kwargs)


def at_least(kind: Callable, minimum, why: str) -> Callable:
    """A parser type: kind(text), refused (one line: the bound and why) when below minimum."""
    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {text}): {why}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, one per Config field."""
    p = OneLineParser(prog="train.py", description="FGSM / FGSM-RS / PGD / Free-AT adversarial training, "
                      "optionally with GradAlign (arXiv 2007.02617), and the methods of methods.py's registry.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, FIELDS)
    return p


# ------------------------------------------------------------------------------------- the checks
def check_flags(cfg: Config) -> str | None:
    """The first problem with the flags, as a one-line message naming the fix, or None."""
    import math

    import autoattack_eval
    import data
    import models
    import tracking
    for name, value in dataclasses.asdict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name} must be a finite number (got {value})"
    checks = [
        (seed_problem(cfg.seed) is None, seed_problem(cfg.seed)),
        (threads_problem(cfg.threads) is None, threads_problem(cfg.threads)),
        (0 <= cfg.eps <= 255, f"--eps {cfg.eps:g} is outside [0, 255] (1/255 units: the paper uses 1..16)"),
        (cfg.fgsm_alpha > 0, f"--fgsm_alpha must be > 0 (got {cfg.fgsm_alpha:g}); the paper uses 1.0 or 1.25"),
        (cfg.lr_max >= 0, f"--lr_max must be >= 0 (got {cfg.lr_max:g}); give the peak learning rate, e.g. 0.2"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0 (got {cfg.weight_decay:g}); the paper uses 5e-4"),
        (cfg.epochs >= 0, f"--epochs must be >= 0 (got {cfg.epochs})"),
        (steps_problem(cfg) is None, steps_problem(cfg)),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1 (got {cfg.batch_size})"),
        (cfg.batch_size_eval >= 1, f"--batch_size_eval must be >= 1 (got {cfg.batch_size_eval})"),
        (cfg.minibatch_replay >= 1, f"--minibatch_replay must be >= 1 (got {cfg.minibatch_replay})"),
        (cfg.eval_iter_freq >= 1, f"--eval_iter_freq must be >= 1 (got {cfg.eval_iter_freq})"),
        (cfg.n_layers >= 1 and cfg.n_filters_cnn >= 1, "--n_layers and --n_filters_cnn must be >= 1"),
        (cfg.n_final_eval != 0, "--n_final_eval 0 evaluates nothing: give a positive number or -1 for all"),
        (cfg.n_eval_every_k_iter >= cfg.batch_size,
         (f"--n_eval_every_k_iter {cfg.n_eval_every_k_iter} is below --batch_size {cfg.batch_size}: the "
          "early-stopping subset (whole training batches) would be empty; raise it or lower --batch_size")),
        (cfg.grad_align_cos_lambda >= 0, "--grad_align_cos_lambda must be >= 0"),
        (cfg.minibatch_replay == 1 or cfg.attack == "fgsm",
         "--minibatch_replay > 1 (Free-AT) needs --attack fgsm"),
        (cfg.half_prec or cfg.half_prec_dtype == "auto",
         f"--half_prec_dtype {cfg.half_prec_dtype} has no effect without --half_prec: add --half_prec or drop it"),
        (tracking.missing(cfg.log_to) is None, tracking.missing(cfg.log_to)),
        (not cfg.final_autoattack or autoattack_eval.available(),
         f"--final_autoattack needs torchattacks, an optional extra: run `{autoattack_eval.INSTALL}`"),
        (not cfg.final_autoattack or data.DATASETS[cfg.dataset].n_classes >= autoattack_eval.MIN_CLASSES_DLR,
         (f"--final_autoattack needs at least {autoattack_eval.MIN_CLASSES_DLR} classes (AutoAttack's DLR loss); "
          f"{cfg.dataset} has {data.DATASETS[cfg.dataset].n_classes}: drop the flag")),
        (cfg.nfgsm_noise_mult >= 0,
         f"--nfgsm_noise_mult must be >= 0 (got {cfg.nfgsm_noise_mult:g}); the paper uses 2"),
        (cfg.attack == "nfgsm" or cfg.nfgsm_noise_mult == 2.0, "--nfgsm_noise_mult needs --attack nfgsm"),
        (0 <= cfg.zerograd_q < 1, f"--zerograd_q must be in [0, 1) (got {cfg.zerograd_q:g}); the paper uses 0.35"),
        (cfg.zerograd_q == 0 or (cfg.attack == "fgsm" and cfg.minibatch_replay == 1),
         "--zerograd_q needs --attack fgsm without --minibatch_replay (ZeroGrad filters the FGSM step)"),
        (cfg.multigrad_samples >= 0,
         f"--multigrad_samples must be >= 0 (got {cfg.multigrad_samples}); the paper uses 3"),
        (cfg.multigrad_samples == 0 or (cfg.attack == "fgsm" and cfg.minibatch_replay == 1 and cfg.zerograd_q == 0),
         "--multigrad_samples needs --attack fgsm without --minibatch_replay or --zerograd_q (MultiGrad replaces "
         "the FGSM step)"),
        (cfg.multigrad_agree == -1 or (cfg.multigrad_samples > 0 and 1 <= cfg.multigrad_agree <= cfg.multigrad_samples),
         (f"--multigrad_agree must be -1 or in [1, --multigrad_samples] with --multigrad_samples > 0 (got "
          f"{cfg.multigrad_agree} of {cfg.multigrad_samples})")),
        (cfg.model in models.WIDE_MODELS or (cfg.wrn_depth, cfg.wrn_width) == (28, 10),
         f"--wrn_depth and --wrn_width set a wide network: use them with --model {' or '.join(models.WIDE_MODELS)}"),
        (cfg.wrn_depth >= 10 and (cfg.wrn_depth - 4) % 6 == 0 and cfg.wrn_width >= 1,
         (f"--wrn_depth must be 6n + 4 >= 10 and --wrn_width >= 1 (got {cfg.wrn_depth}, {cfg.wrn_width}); "
          "e.g. 28 or 34, and 10")),
        (cfg.elle_lambda >= 0, f"--elle_lambda must be >= 0 (got {cfg.elle_lambda:g})"),
        (not cfg.elle_adaptive or cfg.elle_lambda > 0,
         "--elle_adaptive needs --elle_lambda > 0 (ELLE-A's lambda_max; the paper uses 4000)"),
        (cfg.elle_lambda == 0 or cfg.grad_align_cos_lambda == 0,
         "--elle_lambda and --grad_align_cos_lambda are two regularisers: use one of them"),
        (cfg.grad_align_every >= 1, f"--grad_align_every must be >= 1 (got {cfg.grad_align_every})"),
        (cfg.grad_align_fd >= 0, f"--grad_align_fd must be >= 0 (got {cfg.grad_align_fd:g}); try 0.001"),
        (cfg.grad_align_cos_lambda > 0 or (cfg.grad_align_grad1 == "auto" and cfg.grad_align_every == 1
                                           and cfg.grad_align_fd == 0),
         "--grad_align_grad1, --grad_align_every and --grad_align_fd need --grad_align_cos_lambda > 0"),
        (cfg.method is None or methods.method_problem(cfg) is None, methods.method_problem(cfg)),
        (fd_half_problem(cfg) is None, fd_half_problem(cfg)),
        (0 < cfg.lr_peak <= 1, f"--lr_peak must be in (0, 1] (got {cfg.lr_peak:g}); this paper's is 0.4"),
        (cfg.lr_schedule == "cyclic" or cfg.lr_peak == UNSET["lr_peak"],
         "--lr_peak needs --lr_schedule cyclic (a protocol that peaks elsewhere: give --lr_schedule cyclic)"),
        (normalization_problem(cfg) is None, normalization_problem(cfg)),
        (not (cfg.protocol == "own" and cfg.half_prec),
         (f"--protocol own: {methods.label_of(cfg)}'s authors train in fp32; drop --half_prec "
          "(or use --protocol paper)")),
    ]
    return next((message for ok, message in checks if not ok), None)


def seed_problem(seed: int) -> str | None:
    """--seed outside numpy's 32-bit seeds (train.py and eval.py)."""
    if 0 <= seed < 2**32:
        return None
    return f"--seed must be in [0, 2**32 - 1] (got {seed}): numpy's seeds are 32-bit"


def threads_problem(threads: int | None) -> str | None:
    """--threads below 1 (train.py and eval.py; None leaves torch's own choice)."""
    if threads is None or threads >= 1:
        return None
    return f"--threads must be >= 1 (got {threads}); leave it out for torch's own choice"


# More training steps than any run could finish: at a millisecond a step (ten times the quick start's
# pace, evaluations included) 10**9 steps train for 11 days; the paper's longest run has 30 x 390 + 1.
MAX_TRAINING_STEPS = 10**9


def steps_problem(cfg: Config) -> str | None:
    """A run of more than MAX_TRAINING_STEPS steps (cost.training_steps), as one line; None otherwise
    (a non-positive batch size or epoch count is left to its own check)."""
    import cost
    if cfg.batch_size < 1 or cfg.epochs < 0:
        return None
    steps = cost.training_steps(cfg)
    if steps <= MAX_TRAINING_STEPS:
        return None
    return (f"--epochs {cfg.epochs} means {steps:.3g} training steps, more than any run could finish (10**9: 11 days "
            "at 1 ms a step); give fewer epochs (the paper trains 30)")


def fd_half_problem(cfg: Config) -> str | None:
    """The finite-difference GradAlign in half precision (utils.refuse_fd_in_half_precision)."""
    import utils
    return utils.refuse_fd_in_half_precision(cfg.grad_align_fd, cfg.half_prec)


def normalization_problem(cfg: Config) -> str | None:
    import data
    import models
    return models.normalization_problem(cfg.normalize, data.DATASETS[cfg.dataset].shape[0])


# ------------------------------------------------------------------------------ the registry's flags
# methods.py's entries name train.py flags (defaults=, recipes), which this module declares; it imports
# methods.py, so those flags are checked here, when a command first reads the registry after an entry
# was added, rather than by methods.register.
_CHECKED: dict[str, methods.Method] = {}  # the entries registered from outside whose flags passed, by name


def entry_problem(m: methods.Method) -> str | None:
    """What is wrong with the train.py flags of a registry entry, in one line, or None: its defaults=
    name no flag, or a recipe's words (on digits, at eps 8) are not train.py's, do not select the
    entry, or train runs under a label that is not one of its rows (register()'s rows=; ROW_ORDER for a
    built-in entry)."""
    unknown = sorted(set(m.defaults) - set(FIELDS))
    if unknown:
        return f"method '{m.name}': defaults= names {unknown}, which are no train.py flags (config.py)"
    rows = methods.added_rows(m.name)
    rows = methods.ROW_ORDER if rows is None else rows
    for key, recipe in m.recipes.items():
        what = f"method '{m.name}': recipe '{key}'"
        heard = io.StringIO()
        try:
            words = recipe.flags(8, "digits")
            with contextlib.redirect_stderr(heard):
                cfg, _ = config_and_defaults(build_parser().parse_args(words))
            selected = m in methods.select(cfg)
            label = methods.label_of(cfg)
        except SystemExit:
            said = heard.getvalue().strip().splitlines()[-1:] or [""]
            return f"{what}: its flags are not train.py's ({said[0].removeprefix('train.py: error: ')})"
        except Exception as exc:  # the recipe's or the entry's own code may raise anything
            return f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        if not selected:
            return f"{what} does not select it; add --method={m.name} to its words"
        if label not in rows:
            return f"{what} trains runs labelled '{label}', which is not one of its rows {list(rows)}; add it to rows="
    return None


def registry_problem() -> str | None:
    """entry_problem of the first entry registered from outside (methods.register) whose flags have not
    passed yet, or None; the built-in entries' are checked by the tests."""
    for name, m in methods.REGISTRY.items():
        if name in methods.BUILT_IN or _CHECKED.get(name) is m:
            continue
        problem = entry_problem(m)
        if problem:
            return problem
        _CHECKED[name] = m
    return None


def load_methods(path: str) -> str:
    """Runs a methods file (methods.load_file) and checks the flags of what it registered; returns the
    sha256 of its content. Raises ValueError, one line naming the file and what is wrong, and then
    registers nothing."""
    before = methods.snapshot()
    digest = methods.load_file(path)
    problem = registry_problem()
    if problem:
        methods.restore(before)
        raise ValueError(f"methods file {os.path.abspath(path)}: {problem}")
    return digest


def load_recorded(settings: dict) -> str | None:
    """Loads the methods file that a run's config.json records, if any. Returns why the methods now
    registered may not be those the run trained with, in one line (the file is missing or fails, or
    its content changed since), or None."""
    path = settings.get("methods_file")
    if not path:
        return None
    if not os.path.isfile(path):
        return f"the methods file {path} that a run's config.json names is missing; restore it, or give --methods_file"
    try:
        load_methods(path)
    except ValueError as exc:
        return f"{exc} (a run's config.json names this file)"
    return methods.changed_since(settings, path)


# ---------------------------------------------------------------------------------------- defaults
def defaults(attack: str = "fgsm") -> dict:
    """The default of every Config field for this --attack (run names list the settings that differ
    from them): the declared default, UNSET for a flag left unset, then the attack's own (methods.py)."""
    values = {name: _default(name) for name in FIELDS}
    values.update(UNSET)
    values.update(methods.attack_defaults(attack))
    return values


def resolved_defaults(values: dict) -> dict:
    """The default of every field for these settings: defaults(attack), then, with --protocol own, the
    settings of the method's own protocol (methods.own_protocol)."""
    fallback = defaults(values.get("attack", "fgsm"))
    if values.get("protocol", "paper") == "own":
        own = methods.own_protocol(argparse.Namespace(**{**fallback, **values}), values.get("dataset", "cifar10"))
        if own is not None:
            fallback.update(own.settings())
    return fallback


def config_and_defaults(namespace: argparse.Namespace) -> tuple[Config, dict]:
    """The Config of parsed flags (a flag left unset takes its --attack's default, or its protocol's)
    and the default of every field for that attack and protocol. --protocol own for a method of this
    paper is --protocol paper (its own protocol is this paper's), so its runs keep their names."""
    values = vars(namespace).copy()
    fallback = resolved_defaults(values)
    if values["protocol"] == "own" and methods.own_protocol(argparse.Namespace(**{**fallback, **values}),
                                                            values["dataset"]) is None:
        values["protocol"] = "paper"
    for name in UNSET:
        if values[name] is None:
            values[name] = fallback[name]
    return Config(**values), fallback


def load_methods_file(argv: list[str] | None = None, prog: str = "train.py") -> str | None:
    """Imports the --methods_file of a command line (argument files included), so that the parser built
    next lists its methods, and returns its absolute path (None without one); exits with code 2 when the
    file cannot be loaded (load_methods)."""
    pre = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    add_flags(pre, ["methods_file"])
    path = pre.parse_known_args(argv)[0].methods_file
    try:
        if path is not None:
            load_methods(path)
    except ValueError as exc:
        pre.error(str(exc))
    return path


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    """train.py's flags, after its --methods_file is imported; exits with code 2 on a bad one."""
    loaded = load_methods_file(argv)
    parser = build_parser()
    problem = registry_problem()  # a method registered in this process (methods.register) before the parse
    if problem:
        parser.error(problem)
    namespace = parser.parse_args(argv)
    if namespace.methods_file != loaded:
        parser.error("give --methods_file in full (an abbreviated flag is read after the methods)")
    return namespace


def parse_config(argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parses and checks the flags that need no data; exits with code 2 on a bad one.
    Returns the Config and the defaults of its fields."""
    parser = build_parser()
    cfg, fallback = config_and_defaults(parse_flags(argv))
    problem = check_flags(cfg)
    if problem:
        parser.error(problem)
    return cfg, fallback


def record(cfg: Config) -> dict:
    """The settings as config.json records them (a field declared record_default=False only when it
    differs from its default, UNSET's for a flag left unset)."""
    return {name: value for name, value in dataclasses.asdict(cfg).items()
            if FIELDS[name]["record_default"] or value != UNSET.get(name, _default(name))}


def from_record(settings: dict) -> Config:
    """A Config from config.json's settings; a field an older run did not record takes its default."""
    values = resolved_defaults(settings)
    values.update({k: v for k, v in settings.items() if k in FIELDS})
    return Config(**values)
