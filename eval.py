"""Clean and PGD-50-10 accuracy of a checkpoint; on a run's checkpoint, by default its final evaluation again.

    python eval.py --model_path runs/<run>                 # = final.json's 'last' numbers
    python eval.py --model_path runs/<run> --eps 12        # another eps, saved in runs/<run>/evals/
    python eval.py --dataset cifar10 --model resnet18 --model_path models/<name>.pth --eps 8

--model_path is a run directory, a checkpoint file, or a name under models/ (models/<name>.pth, as
the authors' eval.py looked it up). It loads this repo's model.pth, the authors' released {'last',
'best'} files and bare state_dicts (--early_stopped_model picks 'best').

On a run (a config.json beside the checkpoint), every setting without its flag is the one of the
run's final evaluation: dataset, architecture, normalisation and eps, and the points, batch size,
seed, attack, restarts, layout, fp32, device and thread count (FINAL_EVAL), so the numbers equal
final.json's on the same machine and the summary says "= final.json". A flag given explicitly
overrides, and the summary names what it changed. Each result on a run is written atomically to
<run>/evals/<what was evaluated>.json (report.py shows them beside final.json's), or to --out.
Without a config.json (the authors' files) the settings are the flags, else eval.py's defaults
(OWN_DEFAULTS; eps 8), and the summary says where each came from. eps is in 1/255 units; the PGD
step is eps/4. An example counts as robust only if no restart fools it. Weights holding NaN or inf,
or a missing 'best', are errors. The methods file a run records (train.py --methods_file) is
loaded again, with a warning if it is missing or changed.
Progress goes to stderr, then one summary line; the LAST line on stdout is one JSON object:
{"clean_acc", "pgd_acc", "n_eval", "eps", "eps_from", "attack_iters", "n_restarts", "model_path",
"weights", "settings_from", "changed", "final_json", "written", ...}.
--attack autoattack (or apgd-ce, apgd-t) also runs that attack on the same points after PGD-50-10 and
adds its accuracy ("aa_acc", "apgd_ce_acc", "apgd_t_acc"), name, version, library and passes per
example; it needs the optional extra `pip install --no-deps -r requirements-aa.txt`.

Also the evaluation code of train.py's runs: pgd_accuracy (the one PGD evaluation both use),
final_evaluation (final.json's numbers) and add_autoattack (AutoAttack added to a finished run's
final.json; `train.py --final_autoattack` on a finished run calls it).

This file is evaluation's driver (checkpoints, the final evaluation, the command line); the attack loops
that produce every robust accuracy are utils.py's (robust_accuracy, attack_accuracy), beside the PGD
they share with training, and autoattack_eval.py adapts the optional torchattacks library.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys

import torch
from tqdm import tqdm

import autoattack_eval
import config
import data
import models
import numerics
import precision
import rundir
import utils
from config import EXIT_OK, EXIT_USAGE, OneLineParser

# The settings eval.py takes from config.json beside the checkpoint when their flags are not given
# (FROM_RUN_VALID says what a value there must be).
FROM_RUN = ("dataset", "model", "n_layers", "n_filters_cnn", "wrn_depth", "wrn_width", "normalize", "eps")
# The settings of the run's final evaluation (final_settings), taken when their flags are not given.
FINAL_EVAL = ("n_eval", "batch_size_eval", "seed", "attack_iters", "n_restarts", "attack_init", "channels_last",
              "half_prec", "device", "threads")
# ... and their values for a checkpoint without a config.json.
OWN_DEFAULTS = {"n_eval": 256, "batch_size_eval": 1024, "seed": 0, "attack_iters": 50, "n_restarts": 10,
                "attack_init": "random", "channels_last": "auto", "half_prec": False, "device": "auto",
                "threads": None}
# train.py's settings that eval.py takes too, declared in config.py.
SHARED = (*FROM_RUN, "seed", "batch_size_eval", "half_prec", "gpu", "device", "channels_last", "threads",
          "data_dir", "download", "attack_iters", "methods_file")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_flags(p, SHARED, from_run=tuple(n for n in SHARED if n in FROM_RUN or n in FINAL_EVAL),
                     defaults={n: OWN_DEFAULTS[n] for n in SHARED if n in OWN_DEFAULTS},
                     helps={"half_prec": "PGD under autocast (fp16 on CUDA, bf16 on CPU); "
                                         "--attack always runs in fp32", "attack_iters": "PGD steps (of eps/4)"})
    a = p.add_argument
    a("--model_path", required=True,
      help="a run directory, a checkpoint file, or a name under models/ (models/<name>.pth)")
    a("--set", default="test", choices=("train", "test"), help="which split's first --n_eval points")
    run_default = " (default: the run's final evaluation, else {})".format
    a("--n_eval", type=int, default=None, help="first points of the split (-1: all)" + run_default(256))
    a("--n_hidden_fc", type=int, default=1024, help="unused, kept for the authors' command lines")
    a("--early_stopped_model", action="store_true", help="evaluate the 'best' weights of a {'last','best'} file")
    a("--n_restarts", type=int, default=None, help="PGD random restarts" + run_default(10))
    a("--attack_init", default=None, choices=("random", "zero"),
      help="PGD start: uniform in the eps-ball, or zero (then only one restart makes sense)" + run_default("random"))
    a("--attack", default="pgd", choices=("pgd", *autoattack_eval.ATTACKS),
      help="pgd: PGD only; autoattack (the standard version), apgd-ce or apgd-t: PGD, then that attack on the "
           "same points (optional extra: requirements-aa.txt)")
    a("--out", default=None, metavar="FILE",
      help="write the result JSON here instead of into the run's evals/ folder")
    return p


# What a value of config.json that eval.py takes (FROM_RUN) must be.
FROM_RUN_VALID = {
    "dataset": (lambda v: v in data.DATASETS, f"not one of {', '.join(sorted(data.DATASETS))}"),
    "model": (lambda v: v in models.MODELS, f"not one of {', '.join(models.MODELS)}"),
    "n_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "not a whole number >= 1"),
    "n_filters_cnn": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "not a whole number >= 1"),
    "wrn_depth": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 10 and (v - 4) % 6 == 0,
                  "not a whole number 6n + 4 >= 10"),
    "wrn_width": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "not a whole number >= 1"),
    "normalize": (lambda v: v in models.NORMALIZATIONS, f"not one of {', '.join(models.NORMALIZATIONS)}"),
    "eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255,
            "not a number in [0, 255]"),
}


def final_settings(run_config: dict) -> dict:
    """What train.py's final evaluation of this run used, by eval.py's flag names (config.Config's
    fields and final_attack, config.json's device_used and numerics). Raises ValueError (one line) for
    settings that are not train.py's."""
    try:
        cfg = config.from_record(run_config)
        n_iters, n_restarts = cfg.final_attack
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config.json beside the checkpoint is not train.py's ({exc}); give the flags "
                         "explicitly, or move the checkpoint away from it") from None
    recorded = run_config.get("numerics")
    device = str(run_config.get("device_used") or cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "auto"  # the summary names the other device (changes_from_run)
    return {"n_eval": cfg.n_final_eval, "batch_size_eval": cfg.batch_size_eval, "seed": cfg.seed,
            "attack_iters": n_iters, "n_restarts": n_restarts, "attack_init": "random",
            "channels_last": cfg.channels_last, "half_prec": False, "device": device,
            "threads": recorded.get("threads") if isinstance(recorded, dict) else None}


def fill_from_run(args: argparse.Namespace, path: str) -> argparse.Namespace:
    """The flags with the run's settings where none was given: FROM_RUN from the config.json beside the
    checkpoint, FINAL_EVAL from its final evaluation (final_settings); without a config.json (the
    authors' files) train.py's defaults and OWN_DEFAULTS. Sets args.settings_from (each setting's source:
    its flag, 'config.json' or 'default'), args.eps_from and args.run (config.json's settings, or None).
    Raises ValueError (one line) for a config.json that is damaged or not train.py's."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    run_config = rundir.read_json(config_path) if os.path.exists(config_path) else {}
    given = {name for name in (*FROM_RUN, *FINAL_EVAL) if getattr(args, name) is not None}
    needed = [name for name in FROM_RUN if name not in given]
    if not isinstance(run_config, dict):  # unreadable (None), or JSON that is not an object
        raise ValueError(f"{config_path} beside the checkpoint is damaged or not train.py's; give "
                         f"{' '.join('--' + n for n in needed) or 'the flags'} explicitly, or move the checkpoint "
                         "away from it")
    args.run = run_config or None
    fallback = {**config.defaults(), **OWN_DEFAULTS}
    if args.run:
        fallback.update(final_settings(run_config))
    args.settings_from = {}
    for name in (*FROM_RUN, *FINAL_EVAL):
        if name in given:
            args.settings_from[name] = f"--{name}"
            continue
        if name in FROM_RUN and name in run_config:
            valid, why = FROM_RUN_VALID[name]
            if not valid(run_config[name]):
                raise ValueError(f"{config_path} beside the checkpoint is not train.py's: its {name} "
                                 f"{run_config[name]!r} is {why}; give --{name} explicitly")
            setattr(args, name, run_config[name])
        else:
            setattr(args, name, fallback[name])
        args.settings_from[name] = "config.json" if args.run else "default"
    args.eps_from = args.settings_from["eps"] if "eps" in given or "eps" in run_config else "default"
    return args


def load_methods(methods_file: str | None, path: str) -> None:
    """Loads --methods_file (a ValueError if it cannot be), then the methods file that the run's
    config.json beside the checkpoint records, warning in one line on stderr when that one is missing
    or has changed: the evaluation needs only the architecture, which config.json records."""
    if methods_file is not None:
        config.load_methods(methods_file)
    run_config = rundir.read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    note = config.load_recorded(run_config) if isinstance(run_config, dict) else None
    if note:
        print(f"eval.py: warning: {note}", file=sys.stderr)


def resolve_model_path(path: str) -> str:
    """A run directory's model.pth, a file as given, else models/<path>.pth or models/<path> as the
    authors' eval.py looked them up."""
    if os.path.isdir(path):
        inside = os.path.join(path, "model.pth")
        if os.path.isfile(inside):
            return inside
        raise models.CheckpointError(f"{path} is a folder without model.pth (an unfinished run?); give a run "
                                     "directory that has finished, or the checkpoint file, as --model_path")
    for candidate in (path, os.path.join("models", path + ".pth"), os.path.join("models", path)):
        if os.path.isfile(candidate):
            return candidate
    raise models.CheckpointError(f"checkpoint '{path}' not found (nor models/{path}.pth); check --model_path")


def check_flags(args) -> str | None:
    """The first problem with the flags (settings still None are not checked yet), or None."""
    def given(value) -> bool:
        return value is not None
    checks = [
        (not given(args.eps) or 0 <= args.eps <= 255, f"--eps {args.eps or 0:g} is outside [0, 255] (1/255 units)"),
        (not given(args.seed) or config.seed_problem(args.seed) is None,
         given(args.seed) and config.seed_problem(args.seed)),
        (config.threads_problem(args.threads) is None, config.threads_problem(args.threads)),
        (not given(args.n_eval) or (args.n_eval != 0 and args.n_eval >= -1),
         "--n_eval must be positive, or -1 for all points"),
        (not given(args.batch_size_eval) or args.batch_size_eval >= 1, "--batch_size_eval must be >= 1"),
        (not given(args.n_restarts) or args.n_restarts >= 1,
         f"--n_restarts must be >= 1 (got {args.n_restarts}): each restart is one PGD run"),
        (args.attack_init in (None, "random") or args.n_restarts in (None, 1),
         (f"--n_restarts {args.n_restarts} without a random start repeats the same attack; "
          "use --attack_init random or --n_restarts 1")),
    ]
    return next((message for ok, message in checks if not ok), None)


# ------------------------------------------------------------------- the PGD evaluation, shared
def pgd_accuracy(model, batches: data.Batches, eps: float, n_iters: int, n_restarts: int, seed: int, label: str,
                 random_start: bool = True) -> utils.RobustEval:
    """Clean and PGD-n_iters-n_restarts accuracy (step eps/4, eps in [0, 1] units) of model on batches,
    the one PGD evaluation of train.py's final evaluation and of eval.py: equal points, batch size,
    seed, layout, precision and numerics give equal numbers. random_start: restarts from uniform starts
    after torch.manual_seed(seed) (utils.seeded_robust_accuracy); else one run from zero."""
    with tqdm(total=batches.n, desc=f"PGD-{n_iters}-{n_restarts} ({label})", unit="img", leave=False,
              file=sys.stderr, disable=None) as bar:
        if random_start:
            return utils.seeded_robust_accuracy(model, batches, eps, n_iters, n_restarts, seed, progress=bar.update)
        zero = utils.attack_accuracy(model, batches, eps, utils.eval_alpha(eps), n_iters, random_start=False,
                                     clean=True, progress=bar.update)
        return utils.RobustEval(zero.clean_acc, zero.robust_acc, zero.n_eval, zero.n_eval * n_iters)


# ------------------------------------------------------------------------------------ eval.py
def changes_from_run(args, n_eval: int, device, run_n: int) -> list[str]:
    """The settings in which this evaluation differs from the run's final evaluation, in words:
    explicit flags with another value, and another device or thread count than the run recorded."""
    run, final = args.run, final_settings(args.run)
    def said(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)
    ran = {**final, **{name: run.get(name) for name in FROM_RUN}}
    changed = [f"--{name} {said(getattr(args, name))} (the run: {said(ran[name])})" for name in (*FROM_RUN, *FINAL_EVAL)
               if args.settings_from[name] == f"--{name}" and name not in ("n_eval", "device", "threads")
               and getattr(args, name) != ran[name]]
    if n_eval != run_n:
        changed.append(f"{n_eval} points (the run: {run_n})")
    if args.set != "test":
        changed.append(f"--set {args.set} (the run: test)")
    if str(device) != str(run.get("device_used", device)):
        changed.append(f"device {device} (the run: {run['device_used']})")
    if final["threads"] is not None and args.threads != final["threads"]:
        changed.append(f"{args.threads} threads (the run: {final['threads']})")
    return changed


def compared_with_final(args, result: dict, changed: list[str], device) -> tuple[str, bool | None]:
    """(the words after the numbers, whether they equal final.json's): '= final.json' when the settings
    are the final evaluation's and the numbers agree."""
    if not args.run:
        return "", None
    final, _ = rundir.read_final(os.path.dirname(os.path.abspath(result["model_path"])))
    ours = final.get(result["weights"]) if isinstance(final, dict) else None
    if changed or not isinstance(ours, dict):
        return "", None
    if (ours.get("clean_acc"), ours.get("pgd_acc")) == (result["clean_acc"], result["pgd_acc"]):
        return " = final.json", True
    why = numerics.differences(args.run.get("numerics"), numerics.describe(device))
    return (f" (final.json: clean {ours['clean_acc']:.2%}, PGD {ours['pgd_acc']:.2%}; "
            f"{'other numerics: ' + ', '.join(why) if why else 'same settings and numerics'})"), False


def shapes_the_model(args) -> set[str]:
    """The settings worth naming for this architecture: every one, less the wide network's depth and
    width for the other models."""
    wide = ("wrn_depth", "wrn_width")
    return {*FROM_RUN, *FINAL_EVAL} - (set() if args.model in models.WIDE_MODELS else set(wide))


def provenance(args, changed: list[str]) -> str:
    """Where the settings came from, for the summary line."""
    if args.run:
        return "settings: the run's final evaluation" + (" but " + ", ".join(changed) if changed else "")
    shown = shapes_the_model(args)
    said = {name: f"{name} {getattr(args, name)} ({args.settings_from[name]})" for name in (*FROM_RUN, *FINAL_EVAL)
            if name in shown}
    if args.threads is None:
        said["threads"] = f"threads {torch.get_num_threads()} (torch's choice)"
    return "no config.json beside the checkpoint: " + ", ".join(said.values())


def eval_file_name(result: dict, args) -> str:
    """<attack>_eps<eps>_<set><points>_<weights>[_<setting><value> ...].json: what was evaluated, then
    the settings given explicitly that the name does not already say (seed, batch size, layout, ...)."""
    attack = f"pgd-{result['attack_iters']}-{result['n_restarts']}"
    if args.attack != "pgd":
        attack += f"+{args.attack}"
    parts = [attack, f"eps{rundir.name_number(result['eps'])}", f"{args.set}{result['n_eval']}", result["weights"]]
    for name in FINAL_EVAL:
        if name not in ("n_eval", "attack_iters", "n_restarts") and args.settings_from[name] == f"--{name}":
            value = getattr(args, name)
            parts.append(name if value is True else f"{name}{value}")
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", "_".join(parts)) + ".json"


def evaluate(args) -> dict:
    """Loads data and checkpoint (raising one-line errors), then measures clean and PGD accuracy."""
    if args.attack != "pgd":
        autoattack_eval.load_library()  # before any work: a missing extra fails at once
    if args.device is not None:  # a device given explicitly is checked before the checkpoint is looked for
        precision.resolve_device(args.device, args.gpu)
    path = resolve_model_path(args.model_path)
    load_methods(args.methods_file, path)
    args = fill_from_run(args, path)
    problem = check_flags(args)
    if problem:
        raise ValueError(problem)
    device = precision.resolve_device(args.device, args.gpu)
    if args.device == "auto":
        print(precision.device_choice("eval.py", device, args.half_prec, precision.autocast_dtype(device.type)),
              file=sys.stderr)
    info = data.DATASETS[args.dataset]
    problem = autoattack_eval.class_problem(args.attack, info.n_classes) if args.attack != "pgd" else None
    if problem:  # before the checkpoint is read or any point attacked
        raise ValueError(problem)
    data.check_model_input(args.model, info.shape)
    state = models.read_checkpoint(path, "best" if args.early_stopped_model else "last")
    model = models.build_model(args.model, info.n_classes, info.shape, args.n_layers, args.n_filters_cnn,
                               args.normalize, args.wrn_depth, args.wrn_width)
    try:
        models.load_state(model, state)
    except models.CheckpointError as exc:
        if args.run:
            raise
        shown = shapes_the_model(args)
        assumed = " ".join(f"--{n} {getattr(args, n)}" for n in FROM_RUN[:-1]
                           if args.settings_from[n] == "default" and n in shown)
        raise models.CheckpointError(f"{exc} (no config.json beside the checkpoint, so eval.py assumed "
                                     f"{assumed or 'the flags given'})") from None
    eval_layout = precision.pass_layouts(args.channels_last, device.type, args.model)["eval"]
    model = precision.to_device(model, device, tf32=bool(args.run and args.run.get("tf32")),
                            channels_last=eval_layout).eval()
    split = data.load_split(args.dataset, args.data_dir, train=args.set == "train", download=args.download)
    n_eval = len(split) if args.n_eval < 0 else args.n_eval
    if n_eval > len(split):
        raise ValueError(f"--n_eval {n_eval} exceeds the {len(split)} {args.set} points of {args.dataset}; "
                         "use -1 for all")
    if args.run:
        run_n = final_settings(args.run)["n_eval"]
        changed = changes_from_run(args, n_eval, device, len(split) if run_n < 0 else run_n)
    else:
        changed = []
    batches = data.Batches(split, args.batch_size_eval, shuffle=False, drop_last=False, n=n_eval, device=device)
    forward = precision.Autocast(model, device.type) if args.half_prec else model
    eps = args.eps / 255
    weights = "best" if args.early_stopped_model else "last"
    with numerics.threads(args.threads):
        result = pgd_accuracy(forward, batches, eps, args.attack_iters, args.n_restarts, args.seed, weights,
                              random_start=args.attack_init == "random")
        out = {"clean_acc": result.clean_acc, "pgd_acc": result.pgd_acc, "n_eval": result.n_eval, "eps": args.eps,
               "eps_from": args.eps_from,
               "attack_iters": args.attack_iters, "n_restarts": args.n_restarts, "model_path": path,
               "set": args.set, "weights": weights,
               "grad_passes_per_example": result.grad_passes / max(result.n_eval, 1),
               "fp32_redone_passes": precision.take_fp32_redos(forward),
               "eval_layout": precision.layout_names({"eval": eval_layout})["eval"],
               "seed": args.seed, "batch_size_eval": args.batch_size_eval, "attack_init": args.attack_init,
               "half_prec": args.half_prec, "device_used": str(device), "threads_used": torch.get_num_threads(),
               "settings_from": args.settings_from, "changed": changed}
        if args.attack != "pgd":
            with tqdm(total=n_eval, desc=args.attack, unit="img", file=sys.stderr, disable=None) as bar:
                # AutoAttack always gets the fp32 model (--half_prec is for the PGD part only): its APGD steps
                # have no loss scaling, and its numbers then match train.py's --final_autoattack.
                extra = autoattack_eval.attack_accuracy(model, batches, eps, args.attack, args.seed, info.n_classes,
                                                        progress=bar.update)
            out.update(extra.json_fields())
    out["compared"], out["final_json"] = compared_with_final(args, out, changed, device)
    out["provenance"] = provenance(args, changed)
    return out


def destination(args) -> str | None:
    """Where the result goes: --out, else the run's evals/ folder (decided after the evaluation, by
    eval_file_name); None for a checkpoint without a run. Raises ValueError before any work when the
    place cannot be written."""
    if args.out is not None:
        folder = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--out {args.out}: not a file in a writable folder; give a path such as "
                             "results/eval.json in an existing folder")
        return args.out
    try:
        path = resolve_model_path(args.model_path)
    except models.CheckpointError:
        return None  # evaluate() names the problem
    run_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    if not os.access(run_dir, os.W_OK):
        raise ValueError(f"{run_dir} is not writable, so the result cannot go into its {rundir.EVALS_DIR}/ folder; "
                         "give --out FILE")
    return os.path.join(run_dir, rundir.EVALS_DIR)


def save_result(result: dict, args, where: str | None) -> str | None:
    """Writes the result JSON atomically (a file named by eval_file_name under a run's evals/, or
    --out); returns its path, or None when there is nowhere to write."""
    if where is None:
        return None
    path = where if args.out is not None else os.path.join(where, eval_file_name(result, args))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {k: v for k, v in result.items() if k not in ("compared", "provenance")}
    final, _ = rundir.read_final(os.path.dirname(os.path.abspath(result["model_path"])))
    if isinstance(final, dict):  # which training run the weights came from
        record.update({k: final[k] for k in ("run_name", "settings_hash") if k in final})
    rundir.atomic_write_json(path, {**record, "argv": sys.argv[1:] if args.argv is None else args.argv})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    problem = check_flags(args)
    if problem:
        parser.error(problem)
    try:
        where = destination(args)
        result = evaluate(args)
        result["written"] = save_result(result, args, where)
    except (ValueError, data.DataMissingError, models.CheckpointError, autoattack_eval.AttackUnavailable) as exc:
        print(f"eval.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"eval.py: error: {rundir.io_problem(exc, 'the result')}", file=sys.stderr)
        return config.EXIT_IO
    except KeyboardInterrupt:
        return rundir.interrupted("eval.py", "nothing was written")
    written = f"; saved as {result['written']}" if result["written"] else ""
    print(f"clean {result['clean_acc']:.2%}, PGD-{args.attack_iters}-{args.n_restarts} {result['pgd_acc']:.2%} "
          f"on the first {result['n_eval']} {args.set} points, eps {result['eps']:g} (from {result['eps_from']}), "
          f"'{result['weights']}' weights of {result['model_path']}{result.pop('compared')}; "
          f"{result.pop('provenance')}{written}", file=sys.stderr)
    if args.attack != "pgd":
        print(f"{result['attack']} ({result['attack_version']}, {result['attack_library']}) "
              f"{result[autoattack_eval.PREFIX[args.attack] + '_acc']:.2%}", file=sys.stderr)
    print(json.dumps(result))
    return EXIT_OK


# ----------------------------------------------------------------------- train.py's final evaluation
def final_evaluation(cfg: config.Config, model, state_dict: dict, batches: data.Batches, label: str) -> dict:
    """A run's final evaluation of one set of weights, in fp32 and eval mode on a copy of the model:
    clean and PGD-50-10 (pgd_accuracy: eps/4 steps, --seed) accuracy on the first n_final_eval test
    points (an example is robust only if no restart fools it), cos_x_eta on those points, and AutoAttack
    with --final_autoattack. eval.py on the run's model.pth repeats the PGD part (final_settings)."""
    layout = precision.pass_layouts(cfg.channels_last, next(model.parameters()).device.type, cfg.model)["eval"]
    model = precision.set_layout(copy.deepcopy(model).float().eval(), layout)
    model.load_state_dict(state_dict)
    n_iters, n_restarts = cfg.final_attack
    result = pgd_accuracy(model, batches, cfg.eps_frac, n_iters, n_restarts, cfg.seed, label)
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
    if not os.path.isfile(os.path.join(run_dir, "model.pth")):  # before any data is read
        print(f"{prog}: error: cannot add AutoAttack: {run_dir}/model.pth is missing (final.json is there); restore "
              "it, or rerun with --overwrite to retrain", file=sys.stderr)
        return EXIT_USAGE
    info = data.DATASETS[cfg.dataset]
    try:
        split = data.load_split(cfg.dataset, cfg.data_dir, train=False, download=cfg.download)
        n = len(split) if cfg.n_final_eval < 0 else cfg.n_final_eval
        batches = data.Batches(split, cfg.batch_size_eval, shuffle=False, drop_last=False, n=n, device=device)
        model = models.build_model(cfg.model, info.n_classes, info.shape, cfg.n_layers, cfg.n_filters_cnn,
                                   cfg.normalize, cfg.wrn_depth, cfg.wrn_width)
        layout = precision.pass_layouts(cfg.channels_last, device.type, cfg.model)["eval"]
        model = precision.to_device(model, device, channels_last=layout).float().eval()
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


if __name__ == "__main__":
    sys.exit(main())
