"""The compute a sweep needs, projected from its train.py commands and bench.py's units per step.

    DRY_RUN=1 sh/exps_diff_eps_cifar10.sh | python sweep_cost.py --bench bench.json

For each command: the training steps (epoch 0's one step, then epochs x whole batches), the
forward+backward passes of those steps (methods.py's passes per step; a double backprop or a
forward-only pass counted as one pass), the periodic evaluations' passes (every --eval_iter_freq
steps: FGSM, PGD-attack_iters and two input gradients on the test subset, PGD-attack_iters on the
training subset) and the final PGD-50-10's (at most 500 per point, for 'last' and, with
--eval_early_stopped_model, 'best'). Pass counts do not depend on the hardware.

Time: units are bench.py's (one unit: a forward+backward of one training batch; a step of each
method costs `units` of them, measured on the machine bench.py ran on); the evaluation passes are
counted as units of batch_size points. --seconds_per_unit converts units to GPU time; its default,
0.061 s, is one forward+backward of PreAct ResNet-18 on a batch of 128 CIFAR-10 images in mixed
precision on one GeForce RTX 2080 Ti, from Wong, Rice and Kolter (ICLR 2020, arXiv 2001.03994):
their FGSM training took 12 minutes on that GPU (their repository's results table) with their
script's defaults, 15 epochs of 391 batches of 128 at 2 passes per step: 720 s / (15 x 391 x 2)
= 0.061 s. A projection, not a measurement.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections import defaultdict

import config
from cost import FINAL_PASSES_PER_POINT, pass_count, run_cost  # noqa: F401 (the names sweep_cost.py had)

SECONDS_PER_UNIT = 720 / (15 * 391 * 2)  # Wong et al.'s FGSM: 12 minutes, 15 epochs of 391 batches, 2 passes
def units_per_step(bench: dict, model: str, label: str, passes: str) -> float:
    """bench.json's units per step of this method on this model; a method bench.py does not time
    takes those of one it times with the same passes per step."""
    timed = bench["steps"][model]["methods"].values()
    for key in ("label", "passes"):
        for m in timed:
            if m[key] == (label if key == "label" else passes):
                return m["units"]
    raise KeyError(f"bench.json has no {model} method with {passes} passes per step ({label})")


def sweep_cost(commands: list[str], bench: dict | None, seconds_per_unit: float) -> dict:
    rows = defaultdict(lambda: {"runs": 0, "steps": 0, "train_passes": 0, "eval_passes": 0.0, "units": 0.0})
    for line in commands:
        words = shlex.split(line)
        cfg, _ = config.parse_config(words[2:])  # python train.py FLAGS...
        c = run_cost(cfg)
        row = rows[c["label"], c["passes"]]
        eval_passes = c["eval_point_passes"] / c["batch_size"]
        row["runs"] += 1
        row["steps"] += c["steps"]
        row["train_passes"] += c["train_passes"]
        row["eval_passes"] += eval_passes
        if bench is not None:
            row["units"] += c["steps"] * units_per_step(bench, cfg.model, c["label"], c["passes"]) + eval_passes
    out = []
    for (label, passes), r in rows.items():
        out.append({"method": label, "passes_per_step": passes, **r,
                     "gpu_hours": r["units"] * seconds_per_unit / 3600 if bench is not None else math.nan})
    return {"methods": out, "seconds_per_unit": seconds_per_unit}


def hours(h: float) -> str:
    return "–" if math.isnan(h) else f"{h:.0f}"


def format_table(result: dict) -> str:
    head = ("| method | runs | steps | fwd+bwd passes, training (M) | evaluation (M) | GPU-hours (projected) |\n"
            "|---|---|---|---|---|---|")
    lines, total = [head], defaultdict(float)
    for r in result["methods"]:
        lines.append(f"| {r['method']} | {r['runs']} | {r['steps']:,} | {r['train_passes'] / 1e6:.2f} | "
                     f"{r['eval_passes'] / 1e6:.2f} | {hours(r['gpu_hours'])} |")
        for k in ("runs", "steps", "train_passes", "eval_passes", "gpu_hours"):
            total[k] += r[k]
    lines.append(f"| all | {total['runs']:.0f} | {total['steps']:,.0f} | {total['train_passes'] / 1e6:.2f} | "
                 f"{total['eval_passes'] / 1e6:.2f} | {hours(total['gpu_hours'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = config.OneLineParser(prog="sweep_cost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("commands", nargs="?", default="-", help="file of train.py commands, one a line (default: stdin)")
    p.add_argument("--bench", help="bench.json with the sweep's model's units per step (without it: passes only)")
    p.add_argument("--seconds_per_unit", type=float, default=SECONDS_PER_UNIT,
                   help="GPU seconds of one unit (default %(default).3f: see the module docstring)")
    args = p.parse_args(argv)
    if args.seconds_per_unit <= 0:
        p.error(f"--seconds_per_unit {args.seconds_per_unit} must be > 0")
    try:
        if args.commands == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.commands) as f:
                lines = f.read().splitlines()
        commands = [line for line in lines if re.match(r"\s*python\S* train\.py ", line)]
        bench = None
        if args.bench:
            with open(args.bench) as f:
                bench = json.load(f)
    except (OSError, ValueError) as e:
        p.error(f"cannot read the input: {e}")
    if not commands:
        p.error("no 'python train.py ...' command in the input: pipe a sweep's DRY_RUN=1 output into it")
    try:
        result = sweep_cost(commands, bench, args.seconds_per_unit)
    except KeyError as e:
        p.error(f"{e.args[0]}: run bench.py --models <the sweep's model> --parts steps")
    print(format_table(result))
    print(f"(a unit: {args.seconds_per_unit:.3f} GPU seconds)" if bench else "(GPU-hours: pass --bench bench.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
