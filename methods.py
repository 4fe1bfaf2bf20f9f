"""The training methods compared in the paper (arXiv 2007.02617), the later fast adversarial training
methods (N-FGSM, ZeroGrad, ELLE, ELLE-A) and the train.py flags that select each one: the single
table that the sweeps in sh/, the digits demos, bench.py and report.py read.

    python methods.py flags gradalign --eps 8 --dataset cifar10
    python methods.py grid --dataset svhn --methods "fgsm pgd10" --eps "1 2"   # "method eps flags..." lines
    python methods.py lambda --dataset cifar10 --eps 10                        # GradAlign's lambda

Flags come as --flag=value words. eps is in 1/255 units. Per dataset, the flags include the
training schedule of the authors' sweeps (--epochs, --lr_max); the digits demo sets its own.
No torch here: the shell scripts call this once per sweep.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """--epochs and --lr_max of a dataset's sweep: the default, GradAlign's and Free-AT's."""
    epochs: int
    lr_max: str
    gradalign_lr_max: str
    free_at_epochs: int
    free_at_lr_max: str


# The authors' sweep settings (Free-AT replays each batch 8 times, so it runs more epochs).
SCHEDULES = {"cifar10": Schedule(30, "0.2", "0.30", 96, "0.04"),
             "svhn": Schedule(15, "0.05", "0.05", 45, "0.01")}


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
    raise ValueError(f"no GradAlign lambda for dataset '{dataset}': choose cifar10, svhn or digits")


def elle_lambda(eps: float) -> str:
    """ELLE's lambda in its authors' CIFAR-10 scripts: 1000 up to eps 8, 5000 up to 20, 10000 above
    (their grid is the even eps 2..26; an eps in between takes the value of the step it falls in)."""
    return "1000" if eps <= 8 else "5000" if eps <= 20 else "10000"


@dataclass(frozen=True)
class Method:
    label: str    # the name in the paper's tables (report.py's method_name gives the same for these flags)
    passes: str   # forward+backward passes of one step: attack / monitoring pass at x / training pass
    #               (f: a forward only; dbl: a double backprop; ELLE's 3: one pass over three points
    #               per example; GradAlign (FD): 2 passes of the finite difference instead of dbl)
    attack: list[str]

    def flags(self, key: str, eps: float, dataset: str) -> list[str]:
        """The train.py flags of this method at eps on dataset (schedule included where the dataset has one)."""
        words = list(self.attack)
        if key in ("gradalign", "gradalign_fd"):
            words.append(f"--grad_align_cos_lambda={gradalign_lambda(dataset, eps)}")
            if key == "gradalign_fd":
                words.append("--grad_align_fd=0.001")
        elif key == "elle":
            words.append(f"--elle_lambda={elle_lambda(eps)}")
        elif key in ("pgd2", "pgd10"):
            words.append(f"--pgd_alpha_train={eps / (2 if key == 'pgd2' else 5):g}")  # alpha = eps/2, eps/5
        schedule = SCHEDULES.get(dataset)
        if schedule is not None:
            epochs, lr = {"gradalign": (schedule.epochs, schedule.gradalign_lr_max),
                          "gradalign_fd": (schedule.epochs, schedule.gradalign_lr_max),
                          "free_at": (schedule.free_at_epochs, schedule.free_at_lr_max)
                          }.get(key, (schedule.epochs, schedule.lr_max))
            words += [f"--epochs={epochs}", f"--lr_max={lr}"]
        return words


# The paper's methods, in the row order of its tables.
METHODS = {
    "fgsm": Method("FGSM", "2", ["--attack=fgsm", "--attack_init=zero"]),
    "fgsm_rs": Method("FGSM-RS", "2", ["--attack=fgsm", "--attack_init=random"]),  # fgsm_alpha stays 1.25
    "gradalign": Method("FGSM + GradAlign", "3+dbl", ["--attack=fgsm", "--attack_init=zero"]),
    "free_at": Method("Free-AT (m=8)", "2", ["--attack=fgsm", "--attack_init=zero", "--fgsm_alpha=1.0",
                                             "--minibatch_replay=8"]),
    "pgd2": Method("PGD-2", "2+f+1", ["--attack=pgd", "--attack_init=zero", "--pgd_train_n_iters=2"]),
    "pgd10": Method("PGD-10", "10+f+1", ["--attack=pgd", "--attack_init=zero", "--pgd_train_n_iters=10"]),
    # Later methods, each with its paper's CIFAR-10 settings on this protocol's schedule (both N-FGSM's
    # and ELLE's papers also train 30 epochs at lr_max 0.2); README, "Other fast adversarial training
    # methods". N-FGSM: noise 2 eps, step eps, at every eps.
    "nfgsm": Method("N-FGSM", "2", ["--attack=nfgsm", "--fgsm_alpha=1.0", "--nfgsm_noise_mult=2"]),
    "zerograd": Method("ZeroGrad", "2", ["--attack=fgsm", "--attack_init=random", "--fgsm_alpha=2.0",
                                         "--zerograd_q=0.35"]),
    "elle": Method("ELLE", "2+3", ["--attack=fgsm", "--attack_init=zero", "--fgsm_alpha=1.0"]),
    "elle_a": Method("ELLE-A", "2+3", ["--attack=fgsm", "--attack_init=zero", "--fgsm_alpha=1.0",
                                       "--elle_lambda=4000", "--elle_adaptive"]),
    # GradAlign with a finite-difference gradient instead of double backprop (h = 0.001), for bench.py.
    "gradalign_fd": Method("FGSM + GradAlign (FD)", "3+2", ["--attack=fgsm", "--attack_init=zero"]),
}
# Row order of report.py's tables: the paper's methods above, plain training first, and FGSM-RS +
# GradAlign; then the later methods.
ROW_ORDER = ["Standard", "FGSM", "FGSM-RS", "FGSM + GradAlign", "FGSM-RS + GradAlign", "Free-AT (m=8)",
             "PGD-2", "PGD-10", "N-FGSM", "ZeroGrad", "ELLE", "ELLE-A", "FGSM + GradAlign (FD)"]


def flags(method: str, eps: float, dataset: str) -> list[str]:
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': choose from {', '.join(METHODS)}")
    return METHODS[method].flags(method, eps, dataset)


def number(text: str) -> float:
    """An eps as written on a command line ('8', '25.5'): int-valued eps stay ints (8, not 8.0)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="methods.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    one = sub.add_parser("flags", help="the flags of one method")
    one.add_argument("method")
    grid = sub.add_parser("grid", help="one line per (method, eps): method, eps, flags")
    grid.add_argument("--methods", required=True, help="space-separated method names")
    lam = sub.add_parser("lambda", help="GradAlign's lambda")
    for q, eps_help in ((one, "eps in 1/255 units"), (grid, "space-separated eps values"), (lam, "eps")):
        q.add_argument("--dataset", required=True)
        q.add_argument("--eps", required=True, help=eps_help)
    args = p.parse_args(argv)
    try:
        if args.command == "flags":
            print(" ".join(flags(args.method, number(args.eps), args.dataset)))
        elif args.command == "lambda":
            print(gradalign_lambda(args.dataset, number(args.eps)))
        else:
            for method in args.methods.split():
                for eps in args.eps.split():
                    print(method, eps, " ".join(flags(method, number(eps), args.dataset)))
    except ValueError as exc:
        print(f"methods.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
