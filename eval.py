"""Clean and PGD-50-10 accuracy of a checkpoint on the first --n_eval points.

    python eval.py --model_path runs/<run>/model.pth --eps 8 --n_eval 1000
    python eval.py --dataset cifar10 --model resnet18 --model_path models/<name>.pth --eps 8

Loads this repo's model.pth, the authors' released {'last', 'best'} files and bare state_dicts
(--early_stopped_model picks 'best'). --model_path is a file, or a name under models/ as the
authors' eval.py looked it up (models/<name>.pth). The dataset, architecture, input normalisation
and eps (--dataset, --model, --n_layers, --n_filters_cnn, --normalize, --eps) come from the
config.json that train.py wrote beside the checkpoint; flags given explicitly override it, and files
without one (the authors') need the flags (else train.py's defaults, eps 8); the methods file it records
(train.py --methods_file) is loaded again, with a warning if it is missing or changed. eps is in 1/255 units;
the PGD step is eps/4. An example counts as robust only if no restart fools it. Weights holding NaN
or inf, or a missing 'best', are errors.
Progress goes to stderr, with a summary line naming the eps (and where it came from) and the weights;
the LAST line on stdout is one JSON object: {"clean_acc", "pgd_acc", "n_eval", "eps", "eps_from",
"attack_iters", "n_restarts", "model_path", "weights", ...}.
--attack autoattack (or apgd-ce, apgd-t) also runs that attack on the same points after PGD-50-10 and
adds its accuracy ("aa_acc", "apgd_ce_acc", "apgd_t_acc"), name, version, library and passes per
example; it needs the optional extra `pip install --no-deps -r requirements-aa.txt`.

Also the evaluation code of train.py's runs: final_evaluation (final.json's numbers) and
add_autoattack (AutoAttack added to a finished run's final.json; `train.py --final_autoattack` on a
finished run calls it).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from tqdm import tqdm

import autoattack_eval
import config
import data
import methods
import models
import rundir
import utils
from config import EXIT_OK, EXIT_USAGE, OneLineParser

# The settings eval.py takes from config.json beside the checkpoint when their flags are not given
# (FROM_RUN_VALID says what a value there must be).
FROM_RUN = ("dataset", "model", "n_layers", "n_filters_cnn", "normalize", "eps")
# train.py's settings that eval.py takes too, declared in config.py.
SHARED = (*FROM_RUN, "seed", "batch_size_eval", "half_prec", "gpu", "device", "channels_last", "data_dir",
          "download", "methods_file")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_flags(p, SHARED, from_run=FROM_RUN, defaults={"batch_size_eval": 1024},
                     helps={"half_prec": "PGD under autocast (fp16 on CUDA, bf16 on CPU); "
                                         "--attack always runs in fp32"})
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


# What a value of config.json that eval.py takes (FROM_RUN) must be.
FROM_RUN_VALID = {
    "dataset": (lambda v: v in data.DATASETS, f"not one of {', '.join(sorted(data.DATASETS))}"),
    "model": (lambda v: v in models.MODELS, f"not one of {', '.join(models.MODELS)}"),
    "n_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "not a whole number >= 1"),
    "n_filters_cnn": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "not a whole number >= 1"),
    "normalize": (lambda v: v in models.NORMALIZATIONS, f"not one of {', '.join(models.NORMALIZATIONS)}"),
    "eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255,
            "not a number in [0, 255]"),
}


def fill_from_run(args: argparse.Namespace, path: str) -> argparse.Namespace:
    """The flags with the dataset, architecture, normalisation and eps the run's config.json records (explicit flags
    win); without a config.json (the authors' files) the flags or train.py's defaults. Sets
    args.eps_from ('--eps', 'config.json' or 'default'). Raises ValueError (one line) for a config.json
    that is damaged or not train.py's, when a value is taken from it."""
    args.eps_from = "--eps" if args.eps is not None else None
    needed = [name for name in FROM_RUN if getattr(args, name) is None]
    if not needed:
        return args
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    run_config = rundir.read_json(config_path) if os.path.exists(config_path) else {}
    damaged = not isinstance(run_config, dict)  # unreadable (None), or JSON that is not an object
    if damaged:
        raise ValueError(f"{config_path} beside the checkpoint is damaged or not train.py's; give "
                         f"{' '.join('--' + n for n in needed)} explicitly, or move the checkpoint away from it")
    fallback = config.defaults()
    for name in needed:
        if name in run_config:
            valid, why = FROM_RUN_VALID[name]
            if not valid(run_config[name]):
                raise ValueError(f"{config_path} beside the checkpoint is not train.py's: its {name} "
                                 f"{run_config[name]!r} is {why}; give --{name} explicitly")
            setattr(args, name, run_config[name])
        else:
            setattr(args, name, fallback[name])
    if args.eps_from is None:
        args.eps_from = "config.json" if "eps" in run_config else "default"
    return args


def load_methods(methods_file: str | None, path: str) -> None:
    """Loads --methods_file (a ValueError if it cannot be), then the methods file that the run's
    config.json beside the checkpoint records, warning in one line on stderr when that one is missing
    or has changed: the evaluation needs only the architecture, which config.json records."""
    if methods_file is not None:
        methods.load_file(methods_file)
    run_config = rundir.read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    note = methods.load_recorded(run_config) if isinstance(run_config, dict) else None
    if note:
        print(f"eval.py: warning: {note}", file=sys.stderr)


def resolve_model_path(path: str) -> str:
    """A file as given, else models/<path>.pth or models/<path> as the authors' eval.py looked them up."""
    for candidate in (path, os.path.join("models", path + ".pth"), os.path.join("models", path)):
        if os.path.isfile(candidate):
            return candidate
    raise models.CheckpointError(f"checkpoint '{path}' not found (nor models/{path}.pth); check --model_path")


def check_flags(args) -> str | None:
    checks = [
        (args.eps is None or 0 <= args.eps <= 255, f"--eps {args.eps or 0:g} is outside [0, 255] (1/255 units)"),
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
    if args.device == "auto":
        print(utils.device_choice("eval.py", device, args.half_prec, utils.autocast_dtype(device.type)),
              file=sys.stderr)
    path = resolve_model_path(args.model_path)
    load_methods(args.methods_file, path)
    args = fill_from_run(args, path)
    info = data.DATASETS[args.dataset]
    problem = autoattack_eval.class_problem(args.attack, info.n_classes) if args.attack != "pgd" else None
    if problem:  # before the checkpoint is read or any point attacked
        raise ValueError(problem)
    data.check_model_input(args.model, info.shape)
    state = models.read_checkpoint(path, "best" if args.early_stopped_model else "last")
    model = models.build_model(args.model, info.n_classes, info.shape, args.n_layers, args.n_filters_cnn,
                               args.normalize)
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
           "eps_from": args.eps_from,
           "attack_iters": args.attack_iters, "n_restarts": args.n_restarts, "model_path": path,
           "set": args.set, "weights": "best" if args.early_stopped_model else "last",
           "grad_passes_per_example": result.grad_passes / max(result.n_eval, 1),
           "fp32_redone_passes": utils.take_fp32_redos(forward),
           "eval_layout": utils.layout_names({"eval": eval_layout})["eval"]}

    if args.attack != "pgd":
        with tqdm(total=n_eval, desc=args.attack, unit="img", file=sys.stderr, disable=None) as bar:
            # AutoAttack always gets the fp32 model (--half_prec is for the PGD part only): its APGD steps
            # have no loss scaling, and its numbers then match train.py's --final_autoattack.
            extra = autoattack_eval.attack_accuracy(model, batches, eps, args.attack, args.seed, info.n_classes,
                                                    progress=bar.update)
        out.update(extra.json_fields())
    return out


# ----------------------------------------------------------------------- train.py's final evaluation
def final_evaluation(cfg: config.Config, model, state_dict: dict, batches: data.Batches, label: str) -> dict:
    """A run's final evaluation of one set of weights, in fp32 and eval mode on a copy of the model:
    clean and PGD-50-10 (eps/4 steps, --seed) accuracy on the first n_final_eval test points (an example
    is robust only if no restart fools it), cos_x_eta on those points, and AutoAttack with
    --final_autoattack."""
    layout = utils.pass_layouts(cfg.channels_last, next(model.parameters()).device.type, cfg.model)["eval"]
    model = utils.set_layout(copy.deepcopy(model).float().eval(), layout)
    model.load_state_dict(state_dict)
    n_iters, n_restarts = cfg.final_attack
    with tqdm(total=batches.n, desc=f"PGD-{n_iters}-{n_restarts} ({label})", unit="img", leave=False,
              disable=None) as bar:
        result = utils.seeded_robust_accuracy(model, batches, cfg.eps_frac, n_iters, n_restarts, cfg.seed,
                                              progress=bar.update)
    cos = utils.cos_x_eta(model, batches, cfg.eps_frac, cfg.clamp_grad)
    out = {"clean_acc": result.clean_acc, "pgd_acc": result.pgd_acc, "cos_x_eta": cos}
    if cfg.final_autoattack:
        out.update(autoattack_fields(model, batches, cfg.eps_frac, cfg.seed, data.DATASETS[cfg.dataset].n_classes,
                                     batches.n, label))
    return out


# ------------------------------------------------------------------- AutoAttack of a finished run
def autoattack_fields(model, batches, eps: float, seed: int, n_classes: int, n: int, label: str) -> dict:
    """Standard AutoAttack on the final-evaluation points (model in fp32 and eval mode), seeded with
    seed: {"aa_acc", "aa_stage_acc", "aa_grad_passes_per_example", "aa_forward_passes_per_example"}."""
    with tqdm(total=n, desc=f"AutoAttack ({label})", unit="img", leave=False, disable=None) as bar:
        result = autoattack_eval.attack_accuracy(model, batches, eps, "autoattack", seed, n_classes,
                                                 progress=bar.update)
    return result.result_fields()


def lacks_autoattack(final_path: str) -> bool:
    """A finished run's final.json has no AutoAttack accuracy for some weights it evaluated."""
    with open(final_path) as f:
        final = json.load(f)
    return any(key in final and "aa_acc" not in final[key] for key in ("last", "best"))


def add_autoattack(cfg: config.Config, run_dir: str, device, prog: str = "eval.py") -> int:
    """Adds AutoAttack of the saved weights to a finished run's final.json (train.py --final_autoattack
    on a finished run), on the final evaluation's points, without retraining. Returns an exit code."""
    final_path = os.path.join(run_dir, "final.json")
    with open(final_path) as f:
        final = json.load(f)
    info = data.DATASETS[cfg.dataset]
    try:
        split = data.load_split(cfg.dataset, cfg.data_dir, train=False, download=cfg.download)
        n = len(split) if cfg.n_final_eval < 0 else cfg.n_final_eval
        batches = data.Batches(split, cfg.batch_size_eval, shuffle=False, drop_last=False, n=n, device=device)
        model = models.build_model(cfg.model, info.n_classes, info.shape, cfg.n_layers, cfg.n_filters_cnn,
                                   cfg.normalize)
        layout = utils.pass_layouts(cfg.channels_last, device.type, cfg.model)["eval"]
        model = utils.to_device(model, device, channels_last=layout).float().eval()
        for key in ("last", "best"):
            if key in final and "aa_acc" not in final[key]:
                models.load_state(model, models.read_checkpoint(os.path.join(run_dir, "model.pth"), key))
                final[key].update(autoattack_fields(model, batches, cfg.eps_frac, cfg.seed, info.n_classes, n, key))
    except (data.DataMissingError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except models.CheckpointError as exc:
        print(f"{prog}: error: {exc}; rerun with --overwrite to retrain", file=sys.stderr)
        return EXIT_USAGE
    final["autoattack"] = autoattack_eval.describe("autoattack")
    rundir.atomic_write_json(final_path, final)
    rundir.RunLog(None if cfg.debug else os.path.join(run_dir, "log.txt"))(
        "final: AutoAttack added to final.json: " + ", ".join(
            f"{key} {final[key]['aa_acc']:.2%}" for key in ("last", "best") if key in final))
    print(json.dumps({"run_dir": run_dir, **final}))
    return EXIT_OK


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
    except KeyboardInterrupt:
        return rundir.interrupted("eval.py", "nothing was written")
    print(f"clean {result['clean_acc']:.2%}, PGD-{args.attack_iters}-{args.n_restarts} {result['pgd_acc']:.2%} "
          f"on the first {result['n_eval']} {args.set} points, eps {result['eps']:g} (from {result['eps_from']}), "
          f"'{result['weights']}' weights of {result['model_path']}", file=sys.stderr)
    if args.attack != "pgd":
        print(f"{result['attack']} ({result['attack_version']}, {result['attack_library']}) "
              f"{result[autoattack_eval.PREFIX[args.attack] + '_acc']:.2%}", file=sys.stderr)
    print(json.dumps(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
