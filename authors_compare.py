"""Our PGD-50-10 and FGSM+GradAlign step beside the authors' versions, timed on the same model and points.

    python authors_compare.py                                     # the digits cnn and resnet18 (CPU sizes)
    python authors_compare.py --run runs/<run> --authors_code <checkout of their repository>

The authors' final evaluation (their utils.rob_acc) and their GradAlign training step are restated
below as reference_pgd_accuracy and reference_gradalign_step, with the same work per step as their
code; side_by_side times each beside ours (utils.seeded_robust_accuracy, train.train_step) in
interleaved rounds and reports the speedups (medians of the per-round ratio) and both robust
accuracies. --run RUN_DIR attacks a finished run's last weights on the points of its final
evaluation (so ours repeats final.json's robust accuracy); --authors_code DIR also times the authors'
own rob_acc, imported from a checkout of github.com/tml-epfl/understanding-fast-adv-training (nothing
of it is kept here), and checks that the restatement gives its robust accuracy. Without --run the
points are those of bench.py's evaluation part (timing.evaluation_points). Flags shared with bench.py
(sizes, rounds, --budget_s, --threads, --out) are timing.py's. Prints one line per model and writes
--out (authors_compare.json).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import config
import data
import eval as evaluation
import models
import precision
import rundir
import timing
import train
import utils
from config import OneLineParser
from timing import (
    BENCH_LR,
    INPUT_SHAPES,
    EvalSize,
    Settings,
    cnn_flags,
    evaluation_points,
    layout_pair,
    method_config,
    synthetic_batch,
    time_interleaved,
    train_digits_cnn,
    training_step,
)

RUN_FILES = ("config.json", "model.pth", "final.json")  # what --run needs of a finished run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="authors_compare.py", description=__doc__.split("\n\n")[0])
    timing.add_flags(p, out_default="authors_compare.json")
    a = p.add_argument
    a("--run", default=None, metavar="RUN_DIR",
      help="attack this finished train.py run's last weights with the attack, points, batch, eps, seed and layout "
           "of its final evaluation (final.json) instead of the bench models; the GradAlign step is then timed "
           "once, on the bench model of the run's architecture")
    a("--authors_code", default=None, metavar="DIR",
      help="also time the authors' own utils.rob_acc from this checkout of "
           "github.com/tml-epfl/understanding-fast-adv-training (imported, not copied; apex is not needed for its "
           "fp32 path) beside the restatement, and check that both give the same robust accuracy")
    return p


def parse_settings(argv: list[str] | None) -> tuple[Settings, str | None, str | None]:
    """(the sizes, --run, --authors_code), each flag checked (one line and exit 2 for a bad one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run and not all(os.path.isfile(os.path.join(args.run, f)) for f in RUN_FILES):
        parser.error(f"--run {args.run}: not a finished train.py run (it needs {', '.join(RUN_FILES)}); give a "
                     "run's folder under the --out_dir it was trained in")
    if args.authors_code and not os.path.isfile(os.path.join(args.authors_code, "utils.py")):
        parser.error(f"--authors_code {args.authors_code}: no utils.py there; give the folder of a checkout of "
                     "github.com/tml-epfl/understanding-fast-adv-training")
    return timing.settings_from(parser, args, ("reference",)), args.run, args.authors_code


# ---------------------------------------------------------------------------- the authors' versions
def _bounded(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """min then max against one-element tensors built on each call: the authors' clamp, which costs two
    element-wise passes and two small allocations where torch.clamp costs one pass."""
    return torch.max(torch.min(t, torch.full((1,), high, device=t.device)), torch.full((1,), low, device=t.device))


def reference_pgd_accuracy(model: nn.Module, batches, eps: float, n_iters: int, n_restarts: int) -> float:
    """The authors' final evaluation (their utils.attack_pgd inside utils.rob_acc, fp32), restated with
    the same work per step, so that its time is theirs:
    - each restart attacks every example of the batch from a U[-eps, eps] start (drawn into a zero tensor,
      so the draws equal ours and utils.seeded_robust_accuracy's for the same seed);
    - a step is a forward at x + delta, the batch-mean cross-entropy and loss.backward(), which also
      computes and accumulates every weight's gradient (the weights keep requires_grad in their code),
      then delta + eps/4 * sign(gradient), the box and then the eps-ball through min/max clamps, and the
      gradient zeroed: n_iters x n_restarts forward+backward passes per example, no early exit;
    - after each restart a forward without a graph, the per-example cross-entropy, and the restart kept
      where it is at least the best so far (a later restart wins a tie), through boolean masks;
    - per batch: the kept delta projected onto the box, its corner version sign-projected (computed and
      kept for their analyses), a forward, the loss and the correct count read on the host, and both
      deltas copied to host memory; all of them stacked at the end.
    Returns the robust accuracy. The model in eval mode; the caller leaves requires_grad on its weights."""
    alpha, correct, total, kept_deltas = utils.eval_alpha(eps), 0, 0, []
    for x, y in batches:
        best_loss, best = torch.zeros(len(y), device=x.device), torch.zeros_like(x)
        for _ in range(n_restarts):
            delta = torch.zeros_like(x).uniform_(-eps, eps).requires_grad_(True)
            for _ in range(n_iters):
                F.cross_entropy(model(x + delta), y).backward()
                with torch.no_grad():
                    moved = _bounded(x + (delta + alpha * torch.sign(delta.grad)), 0.0, 1.0) - x
                    delta.copy_(_bounded(moved, -eps, eps))
                delta.grad.zero_()
            with torch.no_grad():
                loss = F.cross_entropy(model(x + delta), y, reduction="none")
                higher = loss >= best_loss
                best[higher] = delta.detach()[higher]
                best_loss = torch.max(best_loss, loss)
        best = _bounded(x + best, 0.0, 1.0) - x
        corner = _bounded(x + eps * torch.sign(best), 0.0, 1.0) - x
        with torch.no_grad():
            logits = model(x + best)
            loss = F.cross_entropy(logits, y)
        correct += (logits.max(1)[1] == y).sum().item()
        loss.item()
        total += len(y)
        kept_deltas += [best.cpu().numpy(), corner.cpu().numpy()]
    np.vstack(kept_deltas)  # their rob_acc returns the stacked deltas
    return correct / total


def reference_gradalign_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float,
                             fgsm_alpha: float) -> Callable[[], torch.Tensor]:
    """The authors' FGSM + GradAlign training step (zero start; their train.py's loop body, fp32), restated
    with the same work: the FGSM gradient at the start clamped to the box by min/max, computed with
    create_graph (as their code does whenever GradAlign is on) and only then detached; the step
    fgsm_alpha * eps * sign, clipped to the eps-ball and then the box; the training loss at x + delta;
    grad2, the input gradient of the batch-mean cross-entropy at x + eta (eta ~ U[-eps, eps], not
    clamped), with its graph; the cosine over the examples whose two gradients both have a nonzero norm
    (a boolean selection, which waits for the device); loss + lam * (1 - mean cos), backward, optimiser
    step; then the statistics their loop logs, each read on the host at every step: the loss, the
    regulariser, the correct count, the summed input-gradient norms and the summed L2 norms of the
    box-projected perturbation. Train mode."""
    def call() -> torch.Tensor:
        model.train()
        delta = torch.zeros_like(x, requires_grad=True)
        attack_loss = F.cross_entropy(model(_bounded(x + delta, 0.0, 1.0)), y)
        grad1 = torch.autograd.grad(attack_loss, delta, create_graph=True)[0].detach()
        with torch.no_grad():
            delta = _bounded(delta + fgsm_alpha * (eps * torch.sign(grad1)), -eps, eps)
            delta = _bounded(x + delta, 0.0, 1.0) - x
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y)
        reg = torch.zeros(1, device=x.device)[0]
        eta = torch.zeros_like(x).uniform_(-eps, eps).requires_grad_(True)
        grad2 = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta, create_graph=True)[0]
        norms1, norms2 = (grad1 ** 2).sum([1, 2, 3]) ** 0.5, (grad2 ** 2).sum([1, 2, 3]) ** 0.5
        both = (norms1 != 0) * (norms2 != 0)
        g1, g2 = grad1[both], grad2[both]
        unit1 = g1 / ((g1 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
        unit2 = g2 / ((g2 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
        reg = reg + lam * (1.0 - (unit1 * unit2).sum((1, 2, 3)).mean())
        total = loss + reg
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():  # the logged statistics, each read on the host
            final = _bounded(x + delta, 0.0, 1.0) - x
            logged = [total.item(), reg.item(), (logits.max(1)[1] == y).sum().item(),
                      ((grad1 ** 2).sum([1, 2, 3]) ** 0.5).sum().item(),
                      ((final ** 2).sum([1, 2, 3]) ** 0.5).sum().item()]
        return torch.tensor(logged[0])
    return call


# ------------------------------------------------------------------------------- a finished run
@dataclass(frozen=True)
class RunPoints:
    """A finished run's model and the points, attack, seed and layout of its final evaluation (load_run_points)."""
    model: nn.Module
    model_name: str
    eps: float                      # in [0, 1] units
    batches: list
    size: EvalSize
    seed: int
    channels_last: str              # the run's --channels_last
    final_robust_acc: float | None  # final.json's PGD accuracy of the last weights
    description: str


def load_run_points(run_dir: str, device: torch.device) -> RunPoints:
    """The last weights of a finished train.py run (architecture, normalisation and eps from its config.json,
    read as eval.py reads them) and the points and attack of its final evaluation (final.json's n_eval,
    attack_iters and n_restarts; its first test points in batches of its batch_size_eval; its seed), so
    that ours repeats final.json's robust accuracy. Raises ValueError, models.CheckpointError or
    data.DataMissingError with a one-line message."""
    path = os.path.join(run_dir, "model.pth")
    args = evaluation.fill_from_run(evaluation.build_parser().parse_args(["--model_path", path]), path)
    run_config, final = (rundir.read_json(os.path.join(run_dir, f)) for f in ("config.json", "final.json"))
    counts = ("n_eval", "attack_iters", "n_restarts")
    if (not isinstance(final, dict) or not isinstance(final.get("last"), dict)
            or not all(isinstance(final.get(k), int) and final[k] >= 0 for k in counts)):
        raise ValueError(f"--run {run_dir}: final.json is damaged or not train.py's; evaluate the run again "
                         "(python eval.py --model_path RUN_DIR/model.pth) or give another run")
    info = data.DATASETS[args.dataset]
    model = models.build_model(args.model, info.n_classes, info.shape, args.n_layers, args.n_filters_cnn,
                               args.normalize)
    models.load_state(model, models.read_checkpoint(path, "last"))
    split = data.load_split(args.dataset, run_config.get("data_dir", args.data_dir), train=False)
    size = EvalSize(final["n_eval"], run_config.get("batch_size_eval", config.defaults()["batch_size_eval"]),
                    final["attack_iters"], final["n_restarts"])
    batches = list(data.Batches(split, size.batch_size, shuffle=False, drop_last=False, n=size.n_eval,
                                device=device))
    name = os.path.basename(os.path.normpath(run_dir))
    return RunPoints(model=precision.to_device(model, device).eval(), eps=args.eps / 255, batches=batches, size=size,
                     seed=run_config.get("seed", 0), final_robust_acc=final["last"].get("pgd_acc"),
                     channels_last=run_config.get("channels_last", "auto"),
                     model_name=args.model, description=f"{args.dataset} test, the last weights of {name}")


def load_authors_code(folder: str) -> types.ModuleType:
    """The authors' utils.py from a checkout of their repository, imported as a module (nothing of it is kept
    in this repository). It imports apex.amp at the top, which only its fp16 path calls: where apex is not
    installed, an empty stand-in takes its place while the file is imported. Raises ValueError (one line)
    when the file has no rob_acc."""
    stand_in = importlib.util.find_spec("apex") is None
    if stand_in:
        apex = types.ModuleType("apex")
        apex.amp = types.ModuleType("apex.amp")
        sys.modules.update({"apex": apex, "apex.amp": apex.amp})
    try:
        spec = importlib.util.spec_from_file_location("authors_utils", os.path.join(folder, "utils.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # whatever their file raises on import, in one line
        raise ValueError(f"--authors_code {folder}: importing its utils.py failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        if stand_in:
            sys.modules.pop("apex", None)
            sys.modules.pop("apex.amp", None)
    if not callable(getattr(module, "rob_acc", None)):
        raise ValueError(f"--authors_code {folder}: its utils.py has no rob_acc; give a checkout of "
                         "github.com/tml-epfl/understanding-fast-adv-training")
    return module


def side_by_side(model_name: str, s: Settings, device: torch.device, digits: tuple | None,
                 deadline: float = math.inf, run_points: RunPoints | None = None,
                 authors: types.ModuleType | None = None) -> dict:
    """Ours beside the authors' (restated above), timed in interleaved rounds on the same model and points:
    the final evaluation's PGD (utils.seeded_robust_accuracy in the evaluation layout, against
    reference_pgd_accuracy with contiguous weights) and the FGSM+GradAlign training step (train.train_step
    in the training layout, against reference_gradalign_step with contiguous weights; each on its own copy
    of the same weights). Speedups are medians of the per-round ratio (authors' time / ours).
    run_points: attack that run's model and points instead (load_run_points). authors: the authors' utils module
    (load_authors_code), whose rob_acc is timed too, on its own copy of the weights."""
    seed = 0
    if run_points is not None:
        size, model, eps, seed = run_points.size, run_points.model, run_points.eps, run_points.seed
        batches, points = run_points.batches, run_points.description
    else:
        size = s.evals[model_name]
        model, eps, batches, points = evaluation_points(model_name, size, s, device, digits)
    layouts = precision.pass_layouts(run_points.channels_last if run_points else "auto", device.type, model_name)
    ours_model = precision.set_layout(copy.deepcopy(model).float().eval(), layouts["eval"])
    theirs_model = precision.set_layout(copy.deepcopy(model).float().eval(), False).requires_grad_(True)
    accs = {}

    def ours():
        accs["ours"] = utils.seeded_robust_accuracy(ours_model, batches, eps, size.n_iters, size.n_restarts,
                                                    seed).pgd_acc

    def theirs():
        torch.manual_seed(seed)
        accs["theirs"] = reference_pgd_accuracy(theirs_model, batches, eps, size.n_iters, size.n_restarts)

    # the training step, on the bench's training batch
    shape, batch = INPUT_SHAPES[model_name], s.batch_sizes[model_name]
    xb, yb = synthetic_batch(shape, batch, device)
    cfg = method_config(model_name, "gradalign", batch, s.device, half_prec=s.half_prec, extra=cnn_flags(s))
    pair = layout_pair(model_name, s, device)
    ours_train = pair[layouts["train"]]
    theirs_train = copy.deepcopy(pair[False])
    opts = []
    for m in (ours_train, theirs_train):
        opts.append(train.make_optimizer(cfg, m))
        opts[-1].param_groups[0]["lr"] = BENCH_LR
    fns = {"pgd_ours": ours, "pgd_theirs": theirs}
    if authors is not None:
        authors_model = copy.deepcopy(theirs_model)

        def authors_code():
            torch.manual_seed(seed)
            accs["authors_code"] = authors.rob_acc(batches, authors_model, eps, utils.eval_alpha(eps), None, False,
                                                   size.n_iters, size.n_restarts, cuda=device.type == "cuda")[0]
        fns["pgd_authors_code"] = authors_code
    scaler = precision.make_scaler(cfg, device)
    steps = {"gradalign_ours": training_step(ours_train.train(), opts[0], scaler, xb, yb, cfg, device),
             "gradalign_theirs": reference_gradalign_step(theirs_train, opts[1], xb, yb, cfg.eps_frac,
                                                          cfg.grad_align_cos_lambda, cfg.fgsm_alpha)}
    # the evaluations and the steps timed apart: a step's few milliseconds are not timed next to seconds of PGD
    halfway = (time.perf_counter() + deadline) / 2 if deadline < math.inf else deadline
    samples = time_interleaved(fns, device, s, halfway)
    samples |= time_interleaved(steps, device, s, deadline)
    ratio = {k: statistics.median(t / o for t, o in zip(samples[f"{k}_theirs"], samples[f"{k}_ours"]))
             for k in ("pgd", "gradalign")}
    code = {} if run_points is None else {"robust_acc_final_json": run_points.final_robust_acc}
    if authors is not None:
        code |= {"robust_acc_authors_code": accs["authors_code"],
                 "restatement_agrees": accs["authors_code"] == accs["theirs"],
                 "pgd_s_authors_code": statistics.median(samples["pgd_authors_code"]),
                 "pgd_speedup_authors_code": statistics.median(
                     t / o for t, o in zip(samples["pgd_authors_code"], samples["pgd_ours"]))}
    return {"model": model_name, "points": points, "seed": seed, **code, **asdict(size), "eps": eps,
            "layouts": precision.layout_names(layouts),
            "rounds": len(samples["pgd_ours"]), "step_rounds": len(samples["gradalign_ours"]),
            "robust_acc_ours": accs["ours"], "robust_acc_theirs": accs["theirs"],
            "pgd_s_ours": statistics.median(samples["pgd_ours"]),
            "pgd_s_theirs": statistics.median(samples["pgd_theirs"]),
            "pgd_speedup": ratio["pgd"], "gradalign_batch_size": batch,
            "gradalign_ms_ours": 1e3 * statistics.median(samples["gradalign_ours"]),
            "gradalign_ms_theirs": 1e3 * statistics.median(samples["gradalign_theirs"]),
            "gradalign_speedup": ratio["gradalign"],
            "samples_s": {k: v for k, v in samples.items()}}


def format_side_by_side(r: dict) -> str:
    return (f"{r['model']}: PGD-{r['n_iters']}-{r['n_restarts']} on {r['n_eval']} points ({r['points']}, batch "
            f"{r['batch_size']}): ours {r['pgd_s_ours']:.2f} s, the authors' {r['pgd_s_theirs']:.2f} s: "
            f"{r['pgd_speedup']:.2f}x faster at robust acc {r['robust_acc_ours']:.3f} (theirs "
            f"{r['robust_acc_theirs']:.3f}); FGSM+GradAlign step (batch {r['gradalign_batch_size']}): ours "
            f"{r['gradalign_ms_ours']:.1f} ms, theirs {r['gradalign_ms_theirs']:.1f} ms: "
            f"{r['gradalign_speedup']:.2f}x ({r['rounds']} rounds, layouts {r['layouts']})"
            + (f"; the authors' own rob_acc {r['pgd_s_authors_code']:.2f} s ({r['pgd_speedup_authors_code']:.2f}x), "
               f"robust acc {r['robust_acc_authors_code']:.3f}: the restatement "
               f"{'agrees' if r['restatement_agrees'] else 'DISAGREES'}" if "pgd_s_authors_code" in r else ""))

# ------------------------------------------------------------------------------------------ output
def main(argv: list[str] | None = None) -> int:
    s, run_dir, authors_code = parse_settings(argv)
    try:  # what --run and --authors_code name, read before any timing
        points = load_run_points(run_dir, torch.device(s.device)) if run_dir else None
        authors = load_authors_code(authors_code) if authors_code else None
    except (ValueError, models.CheckpointError, data.DataMissingError) as exc:
        print(f"authors_compare.py: error: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    with timing.threads(s.threads):  # main() may run inside a test process: torch's count is restored
        run(s, points, authors, run_dir, authors_code)
    return 0


def run(s: Settings, points: RunPoints | None = None, authors: types.ModuleType | None = None,
        run_dir: str | None = None, authors_code: str | None = None) -> None:
    device = torch.device(s.device)
    start = time.perf_counter()
    env = timing.environment(device)
    timing.note_busy(env)
    names = [points.model_name] if points else list(s.models)
    digits = train_digits_cnn(s, device)[:2] if "cnn" in names and points is None else None
    end = start + s.budget_s if s.budget_s > 0 else math.inf  # shared by the models still to time
    report: dict = {**env, "settings": asdict(s), "run": run_dir, "authors_code": authors_code,
                    "versus_reference": {}}
    for i, model_name in enumerate(names):
        deadline = time.perf_counter() + (end - time.perf_counter()) / (len(names) - i)
        r = side_by_side(model_name, s, device, digits if model_name == "cnn" else None, deadline,
                         run_points=points, authors=authors)
        report["versus_reference"][model_name] = r
        print(format_side_by_side(r))
    report["wall_seconds"] = time.perf_counter() - start
    rundir.atomic_write_json(s.out, report)
    print(f"wrote {s.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
