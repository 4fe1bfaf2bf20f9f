"""Clean and PGD-50-10 accuracy of a checkpoint on the first --n_eval points.

    python eval.py --model_path runs/<run>/model.pth --eps 8 --n_eval 1000
    python eval.py --dataset cifar10 --model resnet18 --model_path models/<name>.pth --eps 8

Loads this repo's model.pth, the authors' released {'last', 'best'} files and bare state_dicts
(--early_stopped_model picks 'best'). --model_path is a file, or a name under models/ as the
authors' eval.py looked it up (models/<name>.pth). The dataset and architecture (--dataset, --model,
--n_layers, --n_filters_cnn) come from the config.json that train.py wrote beside the checkpoint;
flags given explicitly override it, and files without one (the authors') need the flags. eps is in
1/255 units; the PGD step is eps/4. An example counts as robust only if no restart fools it. Progress goes to stderr; the LAST line on stdout is one JSON
object: {"clean_acc", "pgd_acc", "n_eval", "eps", "attack_iters", "n_restarts", "model_path", ...}.
--attack autoattack (or apgd-ce, apgd-t) also runs that attack on the same points after PGD-50-10 and
adds its accuracy ("aa_acc", "apgd_ce_acc", "apgd_t_acc"), name, version, library and passes per
example; it needs the optional extra `pip install --no-deps -r requirements-aa.txt`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

import autoattack_eval
import config
import data
import models
import rundir
import utils
from config import EXIT_OK, EXIT_USAGE, OneLineParser, add_shared_flags


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_flags(p, from_run=True, batch_size_eval=1024,
                     half_prec_help="evaluate under autocast (fp16 on CUDA, bf16 on CPU)")
    a = p.add_argument
    a("--model_path", required=True, help="checkpoint file, or a name under models/ (models/<name>.pth)")
    a("--set", default="test", choices=("train", "test"), help="which split's first --n_eval points")
    a("--n_eval", type=int, default=256, help="first points of the split (-1: all)")
    a("--n_hidden_fc", type=int, default=1024, help="unused, kept for the authors' command lines")
    a("--early_stopped_model", action="store_true", help="evaluate the 'best' weights of a {'last','best'} file")
    a("--attack_iters", type=int, default=50, help="PGD steps (of eps/4)")
    a("--n_restarts", type=int, default=10, help="PGD random restarts")
    a("--attack_init", default="random", choices=("random", "zero"),
      help="PGD start: uniform in the eps-ball, or zero (then only one restart makes sense)")
    a("--attack", default="pgd", choices=("pgd", *autoattack_eval.ATTACKS),
      help="pgd: PGD only; autoattack (the standard version), apgd-ce or apgd-t: PGD, then that attack on the "
           "same points (optional extra: requirements-aa.txt)")
    return p


# The settings eval.py takes from config.json beside the checkpoint when their flags are not given.
FROM_RUN = ("dataset", "model", "n_layers", "n_filters_cnn")


def fill_from_run(args: argparse.Namespace, path: str) -> argparse.Namespace:
    """The flags with the dataset and architecture the run's config.json records (explicit flags
    win); without a config.json (the authors' files) the flags or train.py's defaults."""
    run_config = rundir.read_config(os.path.dirname(os.path.abspath(path))) or {}
    fallback = config.defaults()
    for name in FROM_RUN:
        if getattr(args, name) is None:
            setattr(args, name, run_config.get(name, fallback[name]))
    return args


def resolve_model_path(path: str) -> str:
    """A file as given, else models/<path>.pth or models/<path> as the authors' eval.py looked them up."""
    for candidate in (path, os.path.join("models", path + ".pth"), os.path.join("models", path)):
        if os.path.isfile(candidate):
            return candidate
    raise models.CheckpointError(f"checkpoint '{path}' not found (nor models/{path}.pth); check --model_path")


def check_flags(args) -> str | None:
    checks = [
        (0 <= args.eps <= 255, f"--eps {args.eps:g} is outside [0, 255] (1/255 units)"),
        (args.n_eval != 0 and args.n_eval >= -1, "--n_eval must be positive, or -1 for all points"),
        (args.batch_size_eval >= 1, "--batch_size_eval must be >= 1"),
        (args.attack_iters >= 0 and args.n_restarts >= 1, "--attack_iters must be >= 0 and --n_restarts >= 1"),
        (args.attack_init == "random" or args.n_restarts == 1,
         (f"--n_restarts {args.n_restarts} without a random start repeats the same attack; "
          "use --attack_init random or --n_restarts 1")),
    ]
    return next((message for ok, message in checks if not ok), None)


def evaluate(args) -> dict:
    """Loads data and checkpoint (raising one-line errors), then measures clean and PGD accuracy."""
    if args.attack != "pgd":
        autoattack_eval.load_library()  # before any work: a missing extra fails at once
    device = utils.resolve_device(args.device, args.gpu)
    path = resolve_model_path(args.model_path)
    args = fill_from_run(args, path)
    info = data.DATASETS[args.dataset]
    problem = autoattack_eval.class_problem(args.attack, info.n_classes) if args.attack != "pgd" else None
    if problem:  # before the checkpoint is read or any point attacked
        raise ValueError(problem)
    data.check_model_input(args.model, info.shape)
    state = models.read_checkpoint(path, "best" if args.early_stopped_model else "last")
    model = models.build_model(args.model, info.n_classes, info.shape, args.n_layers, args.n_filters_cnn)
    models.load_state(model, state)
    eval_layout = utils.pass_layouts(args.channels_last, device.type, args.model)["eval"]
    model = utils.to_device(model, device, channels_last=eval_layout).eval()
    split = data.load_split(args.dataset, args.data_dir, train=args.set == "train", download=args.download)
    n_eval = len(split) if args.n_eval < 0 else args.n_eval
    if n_eval > len(split):
        raise ValueError(f"--n_eval {n_eval} exceeds the {len(split)} {args.set} points of {args.dataset}; "
                         "use -1 for all")
    batches = data.Batches(split, args.batch_size_eval, shuffle=False, drop_last=False, n=n_eval, device=device)
    forward = utils.Autocast(model, device.type) if args.half_prec else model
    eps = args.eps / 255
    with tqdm(total=n_eval, desc=f"PGD-{args.attack_iters}-{args.n_restarts}", unit="img", file=sys.stderr,
              disable=None) as bar:
        if args.attack_init == "random":
            result = utils.seeded_robust_accuracy(forward, batches, eps, args.attack_iters, args.n_restarts,
                                                  args.seed, progress=bar.update)
        else:
            zero = utils.attack_accuracy(forward, batches, eps, utils.eval_alpha(eps), args.attack_iters,
                                         random_start=False, clean=True, progress=bar.update)
            result = utils.RobustEval(zero.clean_acc, zero.robust_acc, zero.n_eval, zero.n_eval * args.attack_iters)
    out = {"clean_acc": result.clean_acc, "pgd_acc": result.pgd_acc, "n_eval": result.n_eval, "eps": args.eps,
           "attack_iters": args.attack_iters, "n_restarts": args.n_restarts, "model_path": path,
           "set": args.set, "weights": "best" if args.early_stopped_model else "last",
           "grad_passes_per_example": result.grad_passes / max(result.n_eval, 1),
           "eval_layout": utils.layout_names({"eval": eval_layout})["eval"]}
    if args.attack != "pgd":
        with tqdm(total=n_eval, desc=args.attack, unit="img", file=sys.stderr, disable=None) as bar:
            extra = autoattack_eval.attack_accuracy(forward, batches, eps, args.attack, args.seed, info.n_classes,
                                                    progress=bar.update)
        out.update(extra.json_fields())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_flags(args)
    if problem:
        parser.error(problem)
    try:
        result = evaluate(args)
    except (ValueError, data.DataMissingError, models.CheckpointError, autoattack_eval.AttackUnavailable) as exc:
        print(f"eval.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"clean {result['clean_acc']:.2%}, PGD-{args.attack_iters}-{args.n_restarts} {result['pgd_acc']:.2%} "
          f"on the first {result['n_eval']} {args.set} points", file=sys.stderr)
    if args.attack != "pgd":
        print(f"{result['attack']} ({result['attack_version']}, {result['attack_library']}) "
              f"{result[autoattack_eval.PREFIX[args.attack] + '_acc']:.2%}", file=sys.stderr)
    print(json.dumps(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
