"""The command line of train.py (its flags and the frozen Config) and the flags eval.py shares with it.

Every perturbation size on the command line is in 1/255 units of inputs in [0, 1]; Config converts it
once (Config.eps_frac). launch.py parses train.py commands here to name their runs without importing
the training code.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import autoattack_eval
import data
import models
import utils

ATTACKS = ("fgsm", "pgd", "pgd_corner", "random_corner", "none", "nfgsm")

# Exit codes of train.py and eval.py (launch.py reports them in these words).
EXIT_OK, EXIT_USAGE, EXIT_LOCKED, EXIT_NONFINITE = 0, 2, 3, 4
EXIT_MEANINGS = {1: "error (see the log)", EXIT_USAGE: "bad input", EXIT_LOCKED: "in progress elsewhere (locked)",
                 EXIT_NONFINITE: "the training loss became NaN or inf"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def add_shared_flags(p: argparse.ArgumentParser, *, from_run: bool = False, batch_size_eval: int = 256,
                     half_prec_help: str = "") -> None:
    """The flags train.py and eval.py both take, declared once. from_run: the dataset and architecture
    flags default to None (eval.py then reads them from the run's config.json)."""
    def default(value):
        return None if from_run else value
    run = " (default: the run's config.json, else {})" if from_run else ""
    a = p.add_argument
    a("--dataset", default=default("cifar10"), choices=sorted(data.DATASETS),
      help="digits is the offline one" + run.format("cifar10"))
    a("--model", default=default("resnet18"), choices=models.MODELS,
      help="PreAct ResNet-18 or the small CNN" + run.format("resnet18"))
    a("--n_layers", type=int, default=default(1),
      help="conv layers of --model cnn (the authors always used 1)" + run.format(1))
    a("--n_filters_cnn", type=int, default=default(16), help="filters of --model cnn" + run.format(16))
    a("--eps", type=float, default=8, help="L-inf radius in 1/255 units")
    a("--seed", type=int, default=0,
      help="random seed (train.py: weights, data order, random starts; eval.py: PGD's random starts)")
    a("--batch_size_eval", type=int, default=batch_size_eval, help="batch size of the evaluations")
    a("--half_prec", action="store_true",
      help=half_prec_help or "mixed precision: autocast fp16 on CUDA, bf16 on CPU")
    a("--gpu", type=int, default=0, help="which GPU: same as --device cuda:N")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--channels_last", default="auto", choices=utils.LAYOUT_CHOICES,
      help="channels_last weights: auto = per pass (training, evaluation) as bench.py measured them "
           "(utils.LAYOUTS); on/off: every pass. Speed only, but another layout rounds differently")
    a("--data_dir", default=os.environ.get("DATA_DIR", "./data"), help="dataset folder (env DATA_DIR)")
    a("--download", action="store_true", help="download missing datasets through torchvision")


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: the authors' flags (same names, defaults and meaning), then this repo's."""
    p = OneLineParser(prog="train.py", description="FGSM / FGSM-RS / PGD / Free-AT adversarial training, "
                      "optionally with GradAlign (arXiv 2007.02617).",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_flags(p, half_prec_help="mixed precision for training and periodic evaluation "
                                       "(fp16 + GradScaler on CUDA, bf16 on CPU)")
    a = p.add_argument
    a("--batch_size", type=int, default=128, help="training batch size")
    a("--epochs", type=int, default=30, help="training epochs (plus the one-iteration epoch 0)")
    a("--lr_schedule", default="cyclic", choices=("cyclic", "piecewise"))
    a("--lr_max", type=float, default=0.2, help="peak learning rate")
    a("--attack", default="fgsm", choices=ATTACKS,
      help="training attack (Free-AT: fgsm with --minibatch_replay>1; nfgsm: N-FGSM, trains outside the eps-ball)")
    a("--attack_iters", type=int, default=10, help="PGD steps of the periodic evaluation")
    a("--pgd_train_n_iters", type=int, default=10, help="PGD steps for --attack pgd training")
    a("--pgd_alpha_train", type=float, default=2.0, help="PGD training step in 1/255 units")
    a("--fgsm_alpha", type=float, default=None,
      help="FGSM step as a multiple of eps (default 1.25; 1.0 for --attack nfgsm, as in its paper)")
    a("--minibatch_replay", type=int, default=1, help="m of Free-AT: each batch is replayed m times")
    a("--weight_decay", type=float, default=5e-4)
    a("--attack_init", default="random", choices=("zero", "random"), help="start of FGSM/PGD training")
    a("--debug", action="store_true", help="no log file; final evaluation PGD-10 with 3 restarts")
    a("--grad_align_cos_lambda", type=float, default=0.0, help="GradAlign's lambda (0: off)")
    a("--eval_early_stopped_model", action="store_true", help="also evaluate the early-stopped ('best') weights")
    a("--final_autoattack", action="store_true",
      help="final.json also gets standard AutoAttack accuracy (optional extra: requirements-aa.txt)")
    a("--eval_iter_freq", type=int, default=200, help="iterations between periodic evaluations")
    a("--n_eval_every_k_iter", type=int, default=256, help="size of the periodic-evaluation subsets")
    a("--n_final_eval", type=int, default=-1, help="first test points of the final evaluation (-1: all)")
    a("--fname", default="plain_cifar10", help="unused, kept for the authors' scripts")
    # --- additions to the authors' flags
    a("--clamp_grad", default="zero", choices=utils.CLAMP_RULES,
      help="gradient of the box clamp in training attacks at pixels exactly 0 or 1: zero = the paper's "
           "runs (PyTorch 1.4), half = the authors' code on PyTorch >= 1.10 (README: Fidelity notes)")
    a("--out_dir", default="runs", help="parent folder of the run directories")
    a("--overwrite", action="store_true", help="retrain even if the run has finished")
    a("--data_on_device", action=argparse.BooleanOptionalAction, default=None,
      help="keep the dataset on the GPU and augment there (default: on for CUDA)")
    a("--half_prec_dtype", default="auto", choices=utils.HALF_PREC_DTYPES,
      help="dtype of --half_prec: auto = float16 on CUDA, bfloat16 on CPU; float16 always comes with a "
           "GradScaler, scaled input gradients and skipped non-finite steps (on the CPU too)")
    a("--tf32", action="store_true", help="let CUDA matmuls and convolutions use TF32 (default: IEEE fp32)")
    # --- successor methods and GradAlign variants (README, "Other fast adversarial training methods")
    a("--nfgsm_noise_mult", type=float, default=2.0,
      help="N-FGSM: the start noise is U[-k eps, k eps], k = this (the paper's k = 2)")
    a("--zerograd_q", type=float, default=0.0,
      help="ZeroGrad: zero this fraction (the smallest |values|) of each example's FGSM gradient before "
           "the sign (0: off; the paper's 0.35); needs --attack fgsm")
    a("--elle_lambda", type=float, default=0.0,
      help="ELLE's lambda on the local-linearity error (0: off); with --elle_adaptive it is ELLE-A's lambda_max")
    a("--elle_adaptive", action="store_true",
      help="ELLE-A: lambda starts at 0, jumps to --elle_lambda when the error spikes, decays by 0.99 otherwise")
    a("--grad_align_grad1", default="auto", choices=("auto", "detached", "graph"),
      help="GradAlign: backprop through the first gradient too (graph) or not (detached); auto = detached "
           "for fgsm/nfgsm (the FGSM gradient is reused), graph for the other attacks (as the authors' code)")
    a("--grad_align_every", type=int, default=1, help="GradAlign: apply the regulariser every k-th iteration only")
    a("--grad_align_fd", type=float, default=0.0,
      help="GradAlign: finite-difference step h (in [0, 1] input units) replacing double backprop (0: exact)")
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
    final_autoattack: bool
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
    half_prec_dtype: str
    tf32: bool
    channels_last: str
    nfgsm_noise_mult: float
    zerograd_q: float
    elle_lambda: float
    elle_adaptive: bool
    grad_align_grad1: str
    grad_align_every: int
    grad_align_fd: float

    @property
    def eps_frac(self) -> float:
        return self.eps / 255

    @property
    def pgd_alpha_eval(self) -> float:
        """Step of every evaluation PGD: eps / 4."""
        return utils.eval_alpha(self.eps_frac)

    @property
    def pgd_alpha_train_frac(self) -> float:
        return self.pgd_alpha_train / 255

    @property
    def free_at(self) -> bool:
        return self.attack == "fgsm" and self.minibatch_replay > 1

    @property
    def grad1_graph(self) -> bool:
        """Whether GradAlign backprops through its first gradient (the attack's for fgsm/nfgsm)."""
        if self.grad_align_grad1 == "auto":
            return self.attack not in ("fgsm", "nfgsm")
        return self.grad_align_grad1 == "graph"

    @property
    def final_attack(self) -> tuple[int, int]:
        """(PGD steps, restarts) of the final evaluation: 50x10, or 10x3 with --debug."""
        return (10, 3) if self.debug else (50, 10)


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
        (cfg.half_prec or cfg.half_prec_dtype == "auto",
         f"--half_prec_dtype {cfg.half_prec_dtype} has no effect without --half_prec: add --half_prec or drop it"),
        (not cfg.final_autoattack or autoattack_eval.available(),
         f"--final_autoattack needs torchattacks, an optional extra: run `{autoattack_eval.INSTALL}`"),
        (not cfg.final_autoattack or data.DATASETS[cfg.dataset].n_classes >= autoattack_eval.MIN_CLASSES_DLR,
         (f"--final_autoattack needs at least {autoattack_eval.MIN_CLASSES_DLR} classes (AutoAttack's DLR loss); "
          f"{cfg.dataset} has {data.DATASETS[cfg.dataset].n_classes}: drop the flag")),
        (cfg.nfgsm_noise_mult >= 0, f"--nfgsm_noise_mult must be >= 0 (got {cfg.nfgsm_noise_mult:g}); the paper uses 2"),
        (cfg.attack == "nfgsm" or cfg.nfgsm_noise_mult == 2.0, "--nfgsm_noise_mult needs --attack nfgsm"),
        (0 <= cfg.zerograd_q < 1, f"--zerograd_q must be in [0, 1) (got {cfg.zerograd_q:g}); the paper uses 0.35"),
        (cfg.zerograd_q == 0 or (cfg.attack == "fgsm" and cfg.minibatch_replay == 1),
         "--zerograd_q needs --attack fgsm without --minibatch_replay (ZeroGrad filters the FGSM step)"),
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
    ]
    return next((message for ok, message in checks if not ok), None)


# Flags whose default depends on --attack: (the default, {attack: its default}). Every other default
# is the parser's.
ATTACK_DEFAULTS = {"fgsm_alpha": (1.25, {"nfgsm": 1.0})}


def defaults(attack: str = "fgsm") -> dict:
    """The default of every Config field for this --attack (run names list the settings that differ
    from them)."""
    parser = build_parser()
    values = {f.name: parser.get_default(f.name) for f in dataclasses.fields(Config)}
    for name, (default, per_attack) in ATTACK_DEFAULTS.items():
        values[name] = per_attack.get(attack, default)
    return values


def config_and_defaults(namespace: argparse.Namespace) -> tuple[Config, dict]:
    """The Config of parsed flags (a flag left unset takes its --attack's default, ATTACK_DEFAULTS) and
    the default of every field for that attack."""
    values = vars(namespace).copy()
    fallback = defaults(values["attack"])
    for name in ATTACK_DEFAULTS:
        if values[name] is None:
            values[name] = fallback[name]
    return Config(**values), fallback


def parse_config(argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parses and checks the flags that need no data; exits with code 2 on a bad one.
    Returns the Config and the defaults of its fields."""
    parser = build_parser()
    cfg, fallback = config_and_defaults(parser.parse_args(argv))
    problem = check_flags(cfg)
    if problem:
        parser.error(problem)
    return cfg, fallback
