"""The words the sweeps in sh/ are made of, from methods.py's registry: the method lists, a method's
train.py flags at an eps on a dataset (its schedule included), the (method, eps) grid, and GradAlign's
lambda.

    python sweep.py list [--paper | --all]                                   # the sweeps' method names
    python sweep.py flags gradalign --eps 8 --dataset cifar10
    python sweep.py flags nfgsm --eps 16 --dataset cifar10 --model wrn28_10 --protocol own
    python sweep.py grid --dataset svhn --methods "fgsm pgd10" --eps "1 2"   # "method eps flags..." lines
    python sweep.py lambda --dataset cifar10 --eps 10                        # GradAlign's lambda
    python sweep.py --methods_file $HOME/fgsm2x.py list                      # with a file's methods too

A bad method, eps or protocol, or a methods file that fails, exits with code 2 and one line.
"""
from __future__ import annotations

import argparse
import sys

import config
import methods


def number(text: str) -> float:
    """An eps as written on a command line ('8', '25.5'): int-valued eps stay ints (8, not 8.0)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    config.add_flags(p, ["methods_file"], helps={"methods_file": "a Python file that registers more methods "
                                                "(train.py --methods_file), loaded first"})
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the methods the sweeps offer, on one line")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--paper", action="store_true", help="only the paper's six methods")
    which.add_argument("--all", action="store_true", help="also those only bench.py measures")
    one = sub.add_parser("flags", help="the flags of one method")
    one.add_argument("method")
    grid = sub.add_parser("grid", help="one line per (method, eps): method, eps, flags")
    grid.add_argument("--methods", required=True, help="space-separated method names")
    lam = sub.add_parser("lambda", help="GradAlign's lambda")
    for q, eps_help in ((one, "eps in 1/255 units"), (grid, "space-separated eps values"), (lam, "eps")):
        q.add_argument("--dataset", required=True)
        q.add_argument("--eps", required=True, help=eps_help)
    for q in (one, grid):
        q.add_argument("--model", default=None, help="the model (N-FGSM's k depends on it; default: the "
                       "protocol's, resnet18 under paper)")
        q.add_argument("--protocol", default="paper", choices=methods.PROTOCOLS,
                       help="own: add the words of each method's own protocol, precision included")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.methods_file is not None:
            config.load_methods(args.methods_file)
        problem = config.registry_problem()  # a method registered in this process before main() ran
        if problem:
            raise ValueError(problem)
        if args.command == "list":
            print(" ".join(name for name, r in methods.recipes().items()
                           if args.all or (r.paper if args.paper else r.listed)))
        elif args.command == "flags":
            print(" ".join(methods.flags(args.method, number(args.eps), args.dataset, args.model, args.protocol)))
        elif args.command == "lambda":
            print(methods.gradalign_lambda(args.dataset, number(args.eps)))
        else:
            for method in args.methods.split():
                for eps in args.eps.split():
                    print(method, eps, " ".join(methods.flags(method, number(eps), args.dataset, args.model,
                                                              args.protocol)))
    except ValueError as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
