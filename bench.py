"""Cost of each training method and of the PGD-50-10 evaluation, measured in this process (cost only:
the pass/fail check of a GPU, fp16 numerics included, is gpu_check.py).

    python bench.py                   # CPU-sized: cnn batch 128 on 8x8 digits, resnet18 batch 32 (< 3 min, 2 cores)
    python bench.py --device cuda     # GPU-sized: cnn batch 512, resnet18 batch 128, real PGD-50-10 on 1024 images
    python bench.py --models wrn28_10 # WideResNet-28-10 (batch 4 on CPU, 128 on CUDA), not in the default list
    python bench.py --models resnet18_nfgsm resnet18_rice wrn28_10_nfgsm   # the later methods' authors' networks

Training: one call of train.train_step (the real step, optimiser update included) for every recipe
of methods.py's registry (the paper's methods, the later ones, GradAlign with its finite-difference
gradient), in units of one forward+backward (parameter gradients,
train mode) of the same model on the same batch at the same precision. Every timed function runs
once per round, in turn, so a change in machine load hits all of them alike; a unit count is the
median over rounds of (step time / forward+backward time of that round).
Evaluation: utils.seeded_robust_accuracy (the final evaluation's code) on a cnn trained on digits
for a few seconds with train.main, and on any other model untrained (random images whose labels are its own
predictions, so every example is attacked): images/s, forward+backward passes per example (the
reference attacks every example in every restart: steps x restarts of them), the robust accuracy
and the floor that accuracy implies (an example that stays robust costs every pass).
With --autoattack, also standard AutoAttack (autoattack_eval.py, torchattacks) on the digits cnn's
points, beside its PGD-50-10: images/s, forward+backward and forward-only passes per example, and
the accuracy after each of its four attacks (--quick: a custom version, 5 iterations, 50 queries).
On CUDA also the peak memory of each (torch.cuda.max_memory_allocated after a reset). On the CPU a
time budget (--budget_s, 150 s) caps the timing rounds, so a busy machine gives fewer rounds, not a
longer run.
Layouts (--parts layouts): each pass (evaluation attack at candidate batch sizes, training attack, GradAlign
step) in contiguous and channels_last layout, interleaved; the choice per pass, beside precision.LAYOUTS.
The comparison with the authors' code (PGD-50-10 and the GradAlign step beside their versions) is
its own tool, authors_compare.py; the flags and helpers both share are in timing.py.
Layout agreement (--parts layout_agreement, not in the default parts): the final PGD-50-10 on 1000 points
(cnn: the digits test split) in both layouts, the examples whose verdict differs counted.
Prints a table and writes --out (bench.json).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

import autoattack_eval
import data
import models
import precision
import rundir
import timing
import train
import utils
from config import OneLineParser
from timing import (
    BENCH_LR,
    DIGITS_EPS,
    INPUT_SHAPES,
    METHODS,
    N_CLASSES,
    EvalSize,
    Settings,
    cnn_flags,
    environment,
    evaluation_points,
    forward_backward,
    layout_pair,
    method_config,
    peak_memory_mib,
    synchronize,
    synthetic_batch,
    time_interleaved,
    train_digits_cnn,
    training_step,
)

EVAL_RESERVE_S = 25.0  # of the CPU time budget, kept for the evaluations (digits training included)

# The cost of the authors' evaluation by construction; their speed is measured live (authors_compare.py).
REFERENCE = {
    "eval_pgd_50_10": {"grad_passes_per_example": 500, "forwards_per_example": 10,
                       "note": "the authors' evaluation attacks every example in every restart: "
                               "10 restarts x 50 steps = 500 forward+backward passes, plus 10 forwards"},
}

PARTS = ("steps", "eval", "layouts", "layout_agreement")
DEFAULT_PARTS = PARTS[:3]  # layout_agreement (minutes of CPU time for resnet18) runs only when asked for
# For one release, the comparison's old flags name its new tool (authors_compare.py) instead of failing as unknown.
MOVED = ("the comparison with the authors' code is its own tool now: python authors_compare.py "
         "[--run RUN_DIR] [--authors_code DIR] (docs/performance.md)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    timing.add_flags(p, out_default="bench.json")
    a = p.add_argument
    a("--autoattack", action="store_true",
      help=f"also time standard AutoAttack on the digits cnn (needs `{autoattack_eval.INSTALL}`)")
    a("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=(*PARTS, "reference"),
      metavar="{" + ",".join(PARTS) + "}",
      help="steps: training-step costs; eval: PGD-50-10 cost; layouts: each pass in both memory layouts and "
           "the evaluation at several batch sizes; layout_agreement: the final PGD-50-10 in both layouts, example "
           f"by example (default: {' '.join(DEFAULT_PARTS)}; the comparison with the authors' code is "
           "authors_compare.py)")
    a("--run", default=None, help=argparse.SUPPRESS)
    a("--authors_code", default=None, help=argparse.SUPPRESS)
    return p


def parse_settings(argv: list[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "reference" in args.parts or args.run or args.authors_code:
        parser.error(MOVED)
    if args.autoattack and not autoattack_eval.available():
        parser.error(f"--autoattack needs torchattacks, an optional extra: run `{autoattack_eval.INSTALL}`")
    if args.autoattack and "cnn" not in args.models:
        parser.error("--autoattack times the digits cnn: add cnn to --models")
    return timing.settings_from(parser, args, tuple(p for p in PARTS if p in args.parts), autoattack=args.autoattack)



# ---------------------------------------------------------------------------------- training steps
def device_settings(model: nn.Module, device: torch.device) -> dict:
    """What the code under test set up (precision.to_device decides channels_last and cuDNN autotuning)."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    if any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs):
        channels_last = True
    elif any(p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last) for p in convs):
        channels_last = False
    else:
        channels_last = None  # every weight has one input channel or 1x1 kernels: both layouts coincide
    out = {"channels_last_weights": channels_last, "channels_last_inputs": False,
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out.update(cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out


def bench_steps(model_name: str, s: Settings, device: torch.device, deadline: float = math.inf) -> dict:
    """Step cost of every method for one model, in forward+backward units of the same batch."""
    torch.manual_seed(0)
    batch_size, shape = s.batch_sizes[model_name], INPUT_SHAPES[model_name]
    model = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
    layouts = precision.pass_layouts("auto", device.type, model_name)
    model = precision.to_device(model, device, channels_last=layouts["train"])
    model = model.train()
    fwd_model = precision.Autocast(model, device.type) if s.half_prec else model
    x = torch.rand(batch_size, *shape, device=device)
    y = torch.randint(0, N_CLASSES, (batch_size,), device=device)
    fns = {"unit": forward_backward(fwd_model, x, y)}
    for method in METHODS:
        cfg = method_config(model_name, method, batch_size, s.device, half_prec=s.half_prec, extra=cnn_flags(s))
        opt = train.make_optimizer(cfg, model)
        opt.param_groups[0]["lr"] = BENCH_LR
        scaler = precision.make_scaler(cfg, device)
        fns[method] = training_step(precision.forward_model(cfg, model, device, scaler), opt, scaler, x, y, cfg, device)
    samples = time_interleaved(fns, device, s, deadline)
    unit = samples["unit"]
    result = {"batch_size": batch_size, "input_shape": list(shape), "settings": device_settings(model, device),
              "rounds": len(unit),
              "unit_ms": 1e3 * statistics.median(unit), "unit_samples_ms": [1e3 * t for t in unit],
              "unit_peak_mib": peak_memory_mib(fns["unit"], device), "methods": {}}
    for method, (label, flags, passes) in METHODS.items():
        steps = samples[method]
        result["methods"][method] = {
            "label": label, "flags": flags, "passes": passes,
            "units": statistics.median(t / u for t, u in zip(steps, unit)),
            "ms": 1e3 * statistics.median(steps), "samples_ms": [1e3 * t for t in steps],
            "peak_mib": peak_memory_mib(fns[method], device)}
    return result


# -------------------------------------------------------------------------------------- evaluation
def timed_robust_accuracy(model: nn.Module, batches, eps: float, size: EvalSize, device: torch.device) -> dict:
    """Runs the final evaluation's attack once; its speed, cost per example and accuracies, and how
    many batch sizes the model saw (early exit shrinks the batches; with cudnn.benchmark on, cuDNN
    autotunes each new size)."""
    sizes: set[int] = set()
    hook = model.register_forward_pre_hook(lambda _module, inputs: sizes.add(inputs[0].shape[0]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        synchronize(device)
        start = time.perf_counter()
        result = utils.seeded_robust_accuracy(model, batches, eps, size.n_iters, size.n_restarts, seed=0)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    full = size.n_iters * size.n_restarts
    passes = result.grad_passes / result.n_eval
    return {**asdict(size), "attack": f"PGD-{size.n_iters}-{size.n_restarts}", "eps": eps, "seconds": seconds,
            "images_per_s": result.n_eval / seconds, "clean_acc": result.clean_acc, "robust_acc": result.pgd_acc,
            "passes_per_example": passes, "reference_passes_per_example": full,
            "floor_passes_per_example": full * result.pgd_acc,
            "pass_examples_per_s": result.grad_passes / seconds,
            "images_per_s_without_early_exit": result.grad_passes / seconds / full,
            "distinct_batch_sizes": len(sizes),
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def timed_autoattack(model: nn.Module, batches, eps: float, s: Settings, device: torch.device) -> dict:
    """AutoAttack once on the points of the PGD evaluation: speed, passes per example, accuracies."""
    budget = {"n_iters": 5, "square_queries": 50} if s.quick else {}
    synchronize(device)
    start = time.perf_counter()
    result = autoattack_eval.attack_accuracy(model, batches, eps, "autoattack", 0, N_CLASSES, **budget)
    synchronize(device)
    seconds = time.perf_counter() - start
    n = result.n_eval
    return {**result.description(), "seconds": seconds, "images_per_s": n / seconds, "clean_acc": result.clean_acc,
            "robust_acc": result.robust_acc, "stage_acc": result.stage_acc,
            "grad_passes_per_example": result.grad_passes / n, "forward_passes_per_example": result.forward_passes / n}


def bench_eval(model_name: str, s: Settings, device: torch.device, digits: tuple | None = None) -> dict:
    """cnn: the trained digits model on the first test points; resnet18, wrn28_10 and cnn_bn: untrained, on random
    images whose labels are its own clean predictions (clean accuracy 1, so every example is attacked)."""
    size = s.evals[model_name]
    if model_name == "cnn":
        model, eps, train_s = digits or train_digits_cnn(s, device)
        model = precision.set_layout(model, precision.pass_layouts("auto", device.type, model_name)["eval"])
        split = data.load_split("digits", "", train=False)
        batches = data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval, device=device)
        result = {"data": f"digits test, cnn trained {s.digits_epochs} epochs with PGD-5 (eps {DIGITS_EPS}/255)",
                  "train_seconds": train_s, **timed_robust_accuracy(model, batches, eps, size, device)}
        if s.autoattack:
            result["autoattack"] = timed_autoattack(model, batches, eps, s, device)
        return result
    torch.manual_seed(0)
    shape = INPUT_SHAPES[model_name]
    model = models.build_model(model_name, N_CLASSES, shape, s.n_layers, s.n_filters_cnn)
    layouts = precision.pass_layouts("auto", device.type, model_name)
    model = precision.to_device(model, device, channels_last=layouts["eval"])
    model = model.eval()
    x = torch.rand(size.n_eval, *shape, device=device)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(1) for part in x.split(size.batch_size)])
    batches = list(zip(x.split(size.batch_size), y.split(size.batch_size)))
    return {"data": "random images, the untrained model's predictions as labels", "train_seconds": 0.0,
            **timed_robust_accuracy(model, batches, 8 / 255, size, device)}


# ------------------------------------------------------------------------------------- memory layouts
def eval_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One pass of an evaluation attack: eval mode, the input gradient (inputs in the weights' layout)."""
    x = x.contiguous(memory_format=precision.input_layout(model))
    delta = torch.zeros_like(x)

    def call():
        model.eval()
        return utils.input_grad(model, x, y, delta)
    return call


def train_attack_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One pass of a training attack: train mode, the input gradient at the clamped point (FGSM's)."""
    delta = torch.zeros_like(x)

    def call():
        model.train()
        return utils.input_grad(model, x, y, delta, clamp_rule="zero")
    return call


def bench_layouts(model_name: str, s: Settings, device: torch.device, deadline: float = math.inf) -> dict:
    """Each pass in both layouts, timed side by side: the evaluation attack's pass at every candidate
    evaluation batch size, the training attack's pass and the GradAlign training step at the training
    batch size (training inputs stay contiguous: converting them would cost a copy per step). The choice
    per pass is channels_last where it was at least precision.LAYOUT_MIN_GAIN faster (median over rounds of
    the per-round ratio; precision.LAYOUTS also asks the layout_agreement part's bound); the evaluation
    batch is the candidate with the least time per example."""
    pair = layout_pair(model_name, s, device)
    shape, batch = INPUT_SHAPES[model_name], s.batch_sizes[model_name]
    sizes = s.eval_batch_candidates[model_name]
    x, y = synthetic_batch(shape, max(*sizes, batch), device)
    fns = {}
    for cl, model in pair.items():
        name = "channels_last" if cl else "contiguous"
        for b in sizes:
            fns[(name, "eval", b)] = eval_pass(model, x[:b], y[:b])
        fns[(name, "train_attack", batch)] = train_attack_pass(model, x[:batch], y[:batch])
        cfg = method_config(model_name, "gradalign", batch, s.device, half_prec=s.half_prec, extra=cnn_flags(s))
        opt = train.make_optimizer(cfg, model)
        opt.param_groups[0]["lr"] = BENCH_LR
        scaler = precision.make_scaler(cfg, device)
        fns[(name, "train_step", batch)] = training_step(model.train(), opt, scaler, x[:batch], y[:batch], cfg, device)
    samples = time_interleaved(fns, device, s, deadline)
    rows = [{"layout": k[0], "pass": k[1], "batch_size": k[2], "ms": 1e3 * statistics.median(v),
             "us_per_example": 1e6 * statistics.median(v) / k[2], "samples_ms": [1e3 * t for t in v]}
            for k, v in samples.items()]
    gains = {}
    for key in fns:
        if key[0] == "contiguous":
            other = ("channels_last", *key[1:])
            gains[f"{key[1]}@{key[2]}"] = statistics.median(c / cl for c, cl in zip(samples[key], samples[other]))
    chosen = {"train": gains[f"train_step@{batch}"] >= precision.LAYOUT_MIN_GAIN,
              "eval": statistics.median(gains[f"eval@{b}"] for b in sizes) >= precision.LAYOUT_MIN_GAIN}
    eval_name = "channels_last" if chosen["eval"] else "contiguous"
    per_example = {b: statistics.median(samples[(eval_name, "eval", b)]) / b for b in sizes}
    table = precision.pass_layouts("auto", device.type, model_name)
    return {"model": model_name, "rounds": len(samples[("contiguous", "eval", sizes[0])]), "rows": rows,
            "channels_last_speedup": gains, "chosen": precision.layout_names(chosen),
            "chosen_eval_batch_size": min(per_example, key=per_example.get),
            "table": precision.layout_names(table), "table_agrees": table == chosen,
            "train_attack_choice": precision.layout_names({"x": gains[f"train_attack@{batch}"]
                                                       >= precision.LAYOUT_MIN_GAIN})["x"]}


def format_layouts(r: dict) -> str:
    gains = ", ".join(f"{k} {v:.2f}x" for k, v in r["channels_last_speedup"].items())
    differs = ("" if r["table_agrees"]
               else ": DIFFERS (a faster layout is taken only if --parts layout_agreement holds its bound)")
    eval_batches = ", ".join(str(x["batch_size"]) for x in r["rows"]
                             if x["layout"] == "contiguous" and x["pass"] == "eval")
    return (f"{r['model']}: channels_last vs contiguous ({r['rounds']} rounds): {gains}; chosen {r['chosen']} "
            f"(precision.LAYOUTS has {r['table']}{differs}), evaluation batch "
            f"{r['chosen_eval_batch_size']} (least time per example of {eval_batches})")


def bench_layout_agreement(model_name: str, s: Settings, device: torch.device, digits: tuple | None) -> dict:
    """The final evaluation (utils.seeded_robust_accuracy, eval mode, fp32, seed 0) of the same weights on the
    same points in both layouts, compared example by example: a different layout may change a verdict only
    through float rounding. cnn: the digits cnn of the eval part on the digits test points; other models:
    random weights (seed 0), random images labelled by the model's own predictions (every example attacked)."""
    size = s.agreement[model_name]
    model, eps, batches, points = evaluation_points(model_name, size, s, device, digits)
    results, seconds = {}, {}
    for cl in (False, True):
        twin = precision.set_layout(copy.deepcopy(model).float().eval(), cl)
        synchronize(device)
        start = time.perf_counter()
        results[cl] = utils.seeded_robust_accuracy(twin, batches, eps, size.n_iters, size.n_restarts, seed=0)
        synchronize(device)
        seconds[cl] = time.perf_counter() - start
    n = results[False].n_eval
    differ = int((results[False].robust != results[True].robust).sum())
    names = {False: "contiguous", True: "channels_last"}
    return {"model": model_name, "points": points, **asdict(size), "eps": eps,
            "attack": f"PGD-{size.n_iters}-{size.n_restarts}", "verdicts_differ": differ,
            "allowed": max(1, n // 1000), "within_rounding": differ <= max(1, n // 1000),
            **{f"{k}_{names[cl]}": v for cl, r in results.items()
               for k, v in (("clean_acc", r.clean_acc), ("robust_acc", r.pgd_acc),
                            ("passes_per_example", r.grad_passes / n), ("seconds", seconds[cl]))}}


def format_layout_agreement(r: dict) -> str:
    return (f"{r['model']}: {r['attack']} on {r['n_eval']} points ({r['points']}, batch {r['batch_size']}), "
            f"contiguous vs channels_last: {r['verdicts_differ']} verdicts differ (allowed {r['allowed']}); robust "
            f"acc {r['robust_acc_contiguous']:.4f} vs {r['robust_acc_channels_last']:.4f}, clean acc "
            f"{r['clean_acc_contiguous']:.4f} vs {r['clean_acc_channels_last']:.4f}, passes per example "
            f"{r['passes_per_example_contiguous']:.2f} vs {r['passes_per_example_channels_last']:.2f}, "
            f"{r['seconds_contiguous']:.1f} s vs {r['seconds_channels_last']:.1f} s")


# ------------------------------------------------------------------------------------------ output
def format_steps(results: dict, cuda: bool) -> str:
    header = f"{'model':9} {'method':22} {'units/step':>10} {'ms/step':>9} {'passes':>7}"
    header += f" {'peak MiB':>9}" if cuda else ""
    lines = [header, "-" * len(header)]
    for model_name, r in results.items():
        line = f"{model_name:9} {'fwd+bwd unit':22} {1.0:10.2f} {r['unit_ms']:9.1f} {'1':>7}"
        lines.append(line + (f" {r['unit_peak_mib']:9.0f}" if cuda else ""))
        for m in r["methods"].values():
            line = f"{model_name:9} {m['label']:22} {m['units']:10.2f} {m['ms']:9.1f} {m['passes']:>7}"
            lines.append(line + (f" {m['peak_mib']:9.0f}" if cuda else ""))
    return "\n".join(lines)


def format_eval(model_name: str, e: dict) -> str:
    text = (f"{model_name}: {e['attack']} on {e['n_eval']} points ({e['data']}): {e['images_per_s']:.1f} images/s, "
            f"{e['passes_per_example']:.1f} fwd+bwd passes per example (reference {e['reference_passes_per_example']}, "
            f"floor {e['floor_passes_per_example']:.1f} = {e['reference_passes_per_example']} x robust acc "
            f"{e['robust_acc']:.3f}: an example that stays robust needs every pass), clean acc {e['clean_acc']:.3f}; "
            f"{e['images_per_s_without_early_exit']:.1f} images/s if every example took every pass")
    if e["peak_mib"] is not None:
        text += (f"; peak {e['peak_mib']:.0f} MiB; {e['distinct_batch_sizes']} distinct batch sizes "
                 f"(cudnn.benchmark {e['cudnn_benchmark']}: each new size is autotuned)")
    if "autoattack" in e:
        a = e["autoattack"]
        stages = ", ".join(f"{name} {acc:.3f}" for name, acc in a["stage_acc"].items())
        text += (f"\n{model_name}: AutoAttack ({a['attack_version']}, {a['attack_library']}) on the same points: "
                 f"{a['images_per_s']:.1f} images/s, {a['grad_passes_per_example']:.1f} fwd+bwd and "
                 f"{a['forward_passes_per_example']:.1f} forward-only passes per example, robust acc after {stages}")
    return text


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    with timing.threads(s.threads):  # main() may run inside a test process: torch's count is restored
        run(s)
    return 0


def run(s: Settings) -> None:
    device = torch.device(s.device)
    start = time.perf_counter()
    env = environment(device)
    timing.note_busy(env)
    timed = [p for p in s.parts if p in ("steps", "layouts")]
    # The budget, less a reserve for the evaluations, is shared by the timed parts and models still to time.
    steps_end = start + s.budget_s - EVAL_RESERVE_S if s.budget_s > 0 else math.inf
    jobs = [(part, m) for part in timed for m in s.models]

    def deadline(done: int) -> float:
        return time.perf_counter() + (steps_end - time.perf_counter()) / (len(jobs) - done)
    report: dict = {**env, "settings": asdict(s), "reference": REFERENCE}
    done = 0
    if "steps" in s.parts:
        steps = report["steps"] = {}
        for model_name in s.models:
            steps[model_name] = bench_steps(model_name, s, device, deadline(done))
            done += 1
        sizes = ", ".join(f"{m} {r['batch_size']}" for m, r in steps.items())
        print(f"training step cost on {env['device_name']} (torch {env['torch']}, {torch.get_num_threads()} threads, "
              f"{'mixed' if s.half_prec else 'fp32'} precision; batch sizes {sizes}; unit = one forward+backward of "
              "the same batch; passes = the step's forward+backward passes: attack + monitoring pass at x (f: forward "
              "only) + training, dbl = GradAlign's double backprop; Free-AT: per iteration)")
        print(format_steps(steps, device.type == "cuda"))
        for model_name, r in steps.items():
            rounds = (f"{r['rounds']} timed round(s)"
                      + (f" of {s.repeats} (time budget)" if r["rounds"] < s.repeats else ""))
            print(f"{model_name}: {rounds}; settings {r['settings']}")
    if "layouts" in s.parts:
        report["layouts"] = {}
        for model_name in s.models:
            report["layouts"][model_name] = r = bench_layouts(model_name, s, device, deadline(done))
            done += 1
            print(format_layouts(r))
    needs_digits = {"eval", "layout_agreement"}
    digits = train_digits_cnn(s, device) if "cnn" in s.models and needs_digits & set(s.parts) else None
    if "eval" in s.parts:
        report["eval"] = {}
        for model_name in s.models:
            report["eval"][model_name] = bench_eval(model_name, s, device, digits if model_name == "cnn" else None)
            print(format_eval(model_name, report["eval"][model_name]))
    if "layout_agreement" in s.parts:
        report["layout_agreement"] = {}
        for model_name in s.models:
            r = report["layout_agreement"][model_name] = bench_layout_agreement(
                model_name, s, device, digits[:2] if model_name == "cnn" else None)
            print(format_layout_agreement(r))
    report["wall_seconds"] = time.perf_counter() - start
    rundir.atomic_write_json(s.out, report)
    print(f"wrote {s.out} ({report['wall_seconds']:.0f} s)")


# ----------------------------------------------------------------------------------- moved names
# Re-exported for one release: the shared helpers live in timing.py now (imported above, and these):
from precision import make_scaler  # noqa: E402, F401
from timing import BENCH_EPS, DIGITS_TRAIN, cpu_busy_fraction, seconds_per_call  # noqa: E402, F401

# ... and the comparison with the authors' code lives in authors_compare.py, a tool of its own, which
# bench.py does not import: these old names say where each one is now.
AUTHORS_COMPARE_NAMES = {"RUN_FILES": "RUN_FILES", "RunPoints": "RunPoints", "load_run_points": "load_run_points",
                         "load_authors_code": "load_authors_code", "reference_pgd_accuracy": "reference_pgd_accuracy",
                         "reference_gradalign_step": "reference_gradalign_step", "bench_reference": "side_by_side",
                         "format_reference": "format_side_by_side"}


def __getattr__(name: str):
    """For one release, bench.<name> of the comparison with the authors' code names its new home."""
    if name in AUTHORS_COMPARE_NAMES:
        raise AttributeError(f"bench.{name} is authors_compare.{AUTHORS_COMPARE_NAMES[name]} now (the comparison "
                             "with the authors' code is its own tool): import authors_compare")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
