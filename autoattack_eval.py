"""AutoAttack and APGD accuracy, run through torchattacks (an optional extra; docs/autoattack.md).

    pip install --no-deps -r requirements-aa.txt

`attack_accuracy(model, batches, eps, "autoattack", seed)` runs the standard AutoAttack of Croce &
Hein (ICML 2020), the protocol of RobustBench: APGD-CE, then APGD-T (DLR loss, 9 target classes),
then FAB-T (9 target classes), then Square (5000 queries), each on the points that every earlier
attack left correctly classified. The four attacks are torchattacks' classes with the hyperparameters
of the authors' standard version: 100 iterations each, one restart, Square with p_init 0.8 and no
rescaled schedule. (torchattacks' own AutoAttack class runs 10 iterations per attack, so it is built
here from its parts.) "apgd-ce" and "apgd-t" run one of those attacks alone.

eps is in [0, 1] image units; images are (B, C, H, W) in [0, 1]. The caller puts the model in eval
mode and fp32, as for utils.robust_accuracy; the library never switches the model's mode here, and
the global random state is the same before and after a call. An example counts as robust only if it
is classified correctly clean and at the (eps-ball- and box-projected) point of every attack.
It is apart from utils.py's attacks only because torchattacks is an optional extra; eval.py drives both.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

INSTALL = "pip install --no-deps -r requirements-aa.txt"
LIBRARY = "torchattacks"
VERSION = "standard"  # RobustBench's; results say "custom" when n_iters or square_queries differ
ATTACKS = ("autoattack", "apgd-ce", "apgd-t")
STAGES = {"autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd-ce": ("apgd-ce",), "apgd-t": ("apgd-t",)}
N_ITERS = 100          # APGD-CE, APGD-T and FAB-T iterations
N_TARGET_CLASSES = 9   # APGD-T and FAB-T target classes (fewer where the data has fewer classes)
SQUARE_QUERIES = 5000  # Square's queries per point
SQUARE_P_INIT = 0.8    # Square's initial fraction of pixels changed
MIN_CLASSES_DLR = 4    # the DLR loss divides by the gap between the largest and the third/fourth logit


class AttackUnavailable(Exception):
    """torchattacks is not installed (one-line message naming the install command)."""


def load_library():
    """The torchattacks module, or AttackUnavailable naming the install command."""
    try:
        import torchattacks
    except ImportError:
        raise AttackUnavailable(f"AutoAttack and APGD need torchattacks, an optional extra: run `{INSTALL}`") from None
    return torchattacks


def class_problem(attack: str, n_classes: int) -> str | None:
    """Why `attack` cannot run on a model with n_classes outputs (one line), or None."""
    if attack != "apgd-ce" and n_classes < MIN_CLASSES_DLR:
        return (f"--attack {attack} needs at least {MIN_CLASSES_DLR} classes (the DLR loss of APGD-T), "
                f"this data set has {n_classes}; use apgd-ce")
    return None


def available() -> bool:
    """Whether torchattacks is installed (without importing it)."""
    return importlib.util.find_spec("torchattacks") is not None


def describe(attack: str, version: str = VERSION, library: str | None = None) -> dict:
    """{"attack", "attack_version", "attack_stages", "attack_library"} of an attack (one of ATTACKS)."""
    library = library or f"{LIBRARY} {load_library().__version__}"
    return {"attack": attack, "attack_version": version, "attack_stages": list(STAGES[attack]),
            "attack_library": library}


PREFIX = {"autoattack": "aa", "apgd-ce": "apgd_ce", "apgd-t": "apgd_t"}  # of the JSON fields


@dataclass
class AttackEval:
    """Outcome of attack_accuracy: fractions in [0, 1] and the attack's cost, counted per example."""
    attack: str                  # 'autoattack', 'apgd-ce' or 'apgd-t'
    version: str                 # 'standard', or 'custom' when the iteration or query budget was changed
    clean_acc: float
    robust_acc: float            # after every stage
    stage_acc: dict[str, float]  # robust accuracy after each stage, in order (AutoAttack's cumulative table)
    n_eval: int
    grad_passes: int             # forward+backward passes (input gradients)
    forward_passes: int          # forward-only passes (queries), clean predictions included
    library: str                 # 'torchattacks 3.5.1'

    def result_fields(self) -> dict:
        """Accuracy, per-stage accuracy and passes per example, keyed '<prefix>_...' (prefix in PREFIX)."""
        p, n = PREFIX[self.attack], max(self.n_eval, 1)
        return {f"{p}_acc": self.robust_acc, f"{p}_stage_acc": self.stage_acc,
                f"{p}_grad_passes_per_example": self.grad_passes / n,
                f"{p}_forward_passes_per_example": self.forward_passes / n}

    def description(self) -> dict:
        """What was run: name, version, stages and library."""
        return describe(self.attack, self.version, self.library)

    def json_fields(self) -> dict:
        """eval.py's extra JSON fields: description() and result_fields()."""
        return {**self.description(), **self.result_fields()}


class _Counted(nn.Module):
    """Forwards to `model`, counting examples per forward pass: with an input that requires a gradient
    (an input-gradient pass) or without (a query). Mode switches are ignored, so the library's
    train()/eval() calls leave the caller's model as it was. Reads only shapes: no host sync."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model = model
        # torchattacks takes the device from the first parameter; this one is there for parameter-free models
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self.grad_passes = self.forward_passes = 0
        self.training = False

    def train(self, mode: bool = True) -> _Counted:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_passes += x.shape[0]
        else:
            self.forward_passes += x.shape[0]
        return self.model(x)


def _build_stage(lib, name: str, model: nn.Module, eps: float, n_classes: int, seed: int, n_iters: int,
                 square_queries: int):
    n_targets = min(N_TARGET_CLASSES, n_classes - 1)
    common = {"norm": "Linf", "eps": eps, "seed": seed, "verbose": False}
    if name == "apgd-ce":
        return lib.APGD(model, steps=n_iters, n_restarts=1, loss="ce", **common)
    if name == "apgd-t":
        attack = lib.APGDT(model, steps=n_iters, n_restarts=1, n_classes=n_classes, **common)
        attack.n_target_classes = n_targets
        return attack
    if name == "fab-t":
        attack = lib.FAB(model, steps=n_iters, n_restarts=1, multi_targeted=True, n_classes=n_classes, **common)
        attack.n_target_classes = n_targets
        return attack
    if name == "square":
        return lib.Square(model, n_queries=square_queries, n_restarts=1, p_init=SQUARE_P_INIT, loss="margin",
                          resc_schedule=False, **common)
    raise ValueError(f"unknown stage '{name}'")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def attack_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float,
                    attack: str = "autoattack", seed: int = 0, n_classes: int = 10, *,
                    n_iters: int = N_ITERS, square_queries: int = SQUARE_QUERIES,
                    progress: Callable | None = None) -> AttackEval:
    """Clean and robust accuracy under `attack` (one of ATTACKS) at L-inf radius eps in [0, 1] units.

    Per batch, each stage runs only on the examples still robust after the previous ones (clean
    misclassifications are never attacked), every stage seeded with `seed`: the same points, batch
    size, seed and device give the same numbers. Each returned point is projected onto the eps-ball
    around x and the box [0, 1] before it is judged. n_iters (APGD, APGD-T, FAB-T) and square_queries
    default to the standard version; other values make a cheaper (or stronger) "custom" version.
    n_classes: classes of the model's output (the targeted stages attack min(9, n_classes - 1) of them).
    Raises AttackUnavailable without torchattacks.
    """
    if attack not in STAGES:
        raise ValueError(f"unknown attack '{attack}': choose one of {', '.join(ATTACKS)}")
    problem = class_problem(attack, n_classes)
    if problem:
        raise ValueError(problem)
    lib = load_library()
    counted = stages = None
    n_clean = n_total = 0
    n_robust = dict.fromkeys(STAGES[attack], 0)
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # the library reseeds the global generators
        for x, y in batches:
            if counted is None:
                counted = _Counted(model, x.device)
                stages = [(name, _build_stage(lib, name, counted, eps, n_classes, seed, n_iters,
                                                   square_queries)) for name in STAGES[attack]]
            robust = _correct(counted, x, y)
            n_clean += int(robust.sum())
            for name, stage in stages:
                active = robust.nonzero().squeeze(1)
                if active.numel() > 0:
                    xa, ya = x[active], y[active]
                    adv = stage(xa, ya).detach()
                    adv = torch.clamp(torch.min(torch.max(adv, xa - eps), xa + eps), 0.0, 1.0)
                    robust[active] = _correct(counted, adv, ya)
                n_robust[name] += int(robust.sum())
            n_total += len(y)
            if progress is not None:
                progress(len(y))
    if n_total == 0:
        raise ValueError("no points to evaluate")
    stage_acc = {name: count / n_total for name, count in n_robust.items()}
    version = VERSION if (n_iters, square_queries) == (N_ITERS, SQUARE_QUERIES) else "custom"
    return AttackEval(attack=attack, version=version, clean_acc=n_clean / n_total,
                      robust_acc=stage_acc[STAGES[attack][-1]], stage_acc=stage_acc, n_eval=n_total,
                      grad_passes=counted.grad_passes, forward_passes=counted.forward_passes,
                      library=f"{LIBRARY} {lib.__version__}")
