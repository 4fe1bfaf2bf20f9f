"""The first command to run on a GPU: does the fp16 path work there, GradAlign included, and what will
the paper's runs cost? Pass/fail, in a few minutes.

    python gpu_check.py                      # --device cuda: at most about 8 minutes on one H100-class GPU
    python gpu_check.py --device cpu         # the rehearsal: tiny sizes, float16 emulated (well under a minute)

Four parts, in this order; gpu_check.json (--out) is rewritten after each one, so a run cut short
keeps what it measured. The exit code is 0 when every check passed, 1 when one failed (the JSON and
the printed lines name it), 2 on bad input, including --device cuda without usable CUDA.

1. agreement: one FGSM+GradAlign step's pieces (lambda 0.2, eps 8/255, zero start) on the same
   batch, in fp32 and on train.py's --half_prec path with float16 (its GradScaler, the scaled
   input-gradient passes, BatchNorm in fp32), on ResNet-18 and the CNNs: cosines of grad1, of grad2
   and of GradAlign's own parameter gradient (not the whole update, which cross-entropy dominates),
   that gradient's norm ratio, and cos_x_eta (AGREEMENT_LIMITS).
2. underflow: the fraction of examples whose input gradient is all zero, in eval mode (as the
   periodic metrics and the final evaluation take them; in train mode BatchNorm couples the examples
   and hides it), on a model made confident (median logit margin 10/15/20/25 nats): fp32, fp16
   unscaled, fp16 scaled as train.py scales it, bf16.
3. cost: seconds per epoch of FGSM, FGSM+GradAlign and PGD-10 under --half_prec on 50,000
   CIFAR-sized images held on the GPU; the periodic evaluation; the final PGD-50-10 on 1000 points
   at batch 1024 with every example staying robust (eps 0: the most passes it can make); one
   resume.pt save; peak allocated and reserved memory of training and of each evaluation; and the
   wall time of a 30-epoch CIFAR-10 run of each method with the sweep's settings (SWEEP), the final
   evaluation counted once per weights evaluated (twice: --eval_early_stopped_model).
4. real_run: the README's quick-start GradAlign run on digits, under --half_prec (float16), against
   the same run in fp32 on the CPU (run here, or read from --cpu_reference final.json): clean,
   PGD-50-10 accuracy and cos_x_eta within REAL_RUN_TOLERANCE.

On the CPU (the rehearsal) every part runs at tiny sizes with float16 emulated by autocast on the
CPU; memory figures are None there. The CUDA tests are not run from here: the test suite runs them
(its `cuda` marker; README, Tests).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import config
import data
import methods
import models
import precision
import rundir
import timing
import train
import utils
from config import OneLineParser

EXIT_FAILED = 1
PARTS = ("agreement", "underflow", "cost", "real_run")
N_CLASSES = timing.N_CLASSES

# Thresholds of the agreement part (fp16 against fp32 on the same weights, batch and eta). float16
# keeps 11 significant bits: each rounding is a relative error of at most 2^-11 = 5e-4, and on the
# CPU's float16 emulation the input gradients agree to a cosine above 0.9999 and GradAlign's parameter
# gradient above 0.99 on both CNNs (docs/gpu.md has the figures). The limits leave a wide margin
# for the GPU's other kernels and still fail a broken path: a double backward that is cut gives a
# zero parameter gradient (cosine 0, norm ratio 0); a loss scale not divided out gives a norm ratio of
# 2^16 / batch or its inverse; fp16 BatchNorm under the 2^16 scale gives a non-finite gradient.
AGREEMENT_LIMITS = {
    "cos_grad1_min": 0.99,        # the FGSM gradient at x (GradAlign's grad1)
    "cos_grad2_min": 0.99,        # the gradient at x + eta (grad2)
    "cos_reg_param_grad_min": 0.9,  # GradAlign's own parameter gradient, through the double backward
    "reg_param_grad_norm_ratio": (0.8, 1.25),  # its norm, fp16 / fp32
    "cos_x_eta_abs_diff_max": 0.01,  # mean per-example cosine between grad1 and grad2
}
AGREEMENT_METHOD = "gradalign"

# The README's quick start (digits, GradAlign), the real run's recipe: `python train.py @<this file>`.
QUICK_START = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "digits_gradalign.args")


def recipe_words(path: str) -> list[str]:
    """The flags of an argument file as train.py reads them (config.read_arg_files: the files it
    includes are read from its folder, so any working directory works)."""
    return config.read_arg_files([f"@{path}"])


# How far the float16 run may land from the fp32 one (accuracies in fractions). Measured on the CPU
# (float16 emulated, seed 0): clean 84.38% in both, PGD-50-10 5.8% against 9.8%, cos_x_eta 0.684
# against 0.694. A different seed moves this recipe's PGD-50-10 between 0 and 26% (docs/gpu.md), so
# its tolerance is loose; cos_x_eta is the sharp one: FGSM without GradAlign ends near 0.4.
REAL_RUN_TOLERANCE = {"clean_acc": 0.03, "pgd_acc": 0.08, "cos_x_eta": 0.05}

# The paper's CIFAR-10 sweep (sh/exps_diff_eps_cifar10.sh; tests/test_gpu_check.py keeps them equal).
SWEEP = {"epochs": methods.SCHEDULES["cifar10"].epochs, "batch_size": 128, "n_train": 50_000,
         "eval_iter_freq": 200, "n_eval_every_k_iter": 256, "batch_size_eval": 1024, "n_final_eval": 1000,
         "final_evaluations": 2}  # --eval_early_stopped_model: 'last' and 'best'
COST_METHODS = ("fgsm", "gradalign", "pgd10")
PERIODIC_ATTACK_ITERS = 10  # train.py's --attack_iters default, the sweep's


@dataclass(frozen=True)
class Sizes:
    """Every size the check uses: the GPU's, or the CPU rehearsal's."""
    agreement_models: tuple[str, ...]
    agreement_batch: int
    underflow_models: tuple[str, ...]
    underflow_batch: int
    cost_model: str
    cost_images: int
    cost_batch: int
    cost_warmup_steps: int
    periodic_points: int
    final_points: int
    final_batch: int
    final_steps: int          # PGD steps of the timed final-evaluation restart (50; fewer on the CPU)
    real_run_extra: tuple[str, ...]  # flags appended to the QUICK_START recipe's


GPU_SIZES = Sizes(agreement_models=("resnet18", "cnn", "cnn_bn"), agreement_batch=128, underflow_models=("resnet18",),
                  underflow_batch=256, cost_model="resnet18", cost_images=SWEEP["n_train"],
                  cost_batch=SWEEP["batch_size"], cost_warmup_steps=10, periodic_points=SWEEP["n_eval_every_k_iter"],
                  final_points=SWEEP["n_final_eval"], final_batch=SWEEP["batch_size_eval"], final_steps=50,
                  real_run_extra=())
CPU_SIZES = Sizes(agreement_models=("cnn", "cnn_bn"), agreement_batch=64, underflow_models=("cnn_bn",),
                  underflow_batch=128, cost_model="cnn", cost_images=96, cost_batch=32, cost_warmup_steps=1,
                  periodic_points=32, final_points=64, final_batch=64, final_steps=5,
                  real_run_extra=("--epochs", "4", "--n_final_eval", "64"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--device", default="cuda", help="cuda (the default), cuda:N, auto, or cpu for the rehearsal at tiny sizes")
    a("--out", default="gpu_check.json", help="the report, rewritten after each part")
    a("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which parts (default: all, in order)")
    a("--cpu_reference", default=None,
      help="final.json of the quick-start run in fp32 on a CPU (default: run it here, about a minute)")
    a("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's own choice)")
    return p


# ------------------------------------------------------------------------------------------- checks
def check(name: str, value, ok: bool, limit: str) -> dict:
    return {"check": name, "value": value, "limit": limit, "passed": bool(ok)}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flattened tensors (in float64); 0 when either is zero."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def config_for(model_name: str, method: str, batch_size: int, device: torch.device, half: bool,
               extra: tuple[str, ...] = ()) -> train.Config:
    """train.py's Config of a method; half: --half_prec with float16 (the paper's apex O1 dtype)."""
    return timing.method_config(model_name, method, batch_size, str(device), half_prec=half,
                               half_prec_dtype="float16" if half else "auto", extra=extra)


def scaler_for(cfg: train.Config, device: torch.device) -> torch.amp.GradScaler:
    return precision.make_scaler(cfg, device)


def build(model_name: str, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return precision.to_device(models.build_model(model_name, N_CLASSES, timing.INPUT_SHAPES[model_name]), device)


def synthetic_batch(model_name: str, batch_size: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(batch_size, *timing.INPUT_SHAPES[model_name], generator=gen)
    y = torch.randint(0, N_CLASSES, (batch_size,), generator=gen)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------- 1. agreement
def gradalign_pieces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: train.Config,
                     device: torch.device) -> dict:
    """One FGSM+GradAlign step's pieces on train.py's forward path for cfg (the fp32 model, or under
    --half_prec its Autocast wrapper with the GradScaler): grad1 (the FGSM gradient at the zero start),
    grad2 (at x + eta, with its graph), per-example cos(grad1, grad2), and the parameter gradients of
    the regulariser and of the cross-entropy at the FGSM point, each taken as the training backward
    takes it (through the scaler's scale, then divided by it). The caller seeds eta."""
    scaler = scaler_for(cfg, device)
    fwd = precision.forward_model(cfg, model, device, scaler)
    eps = cfg.eps_frac
    delta, grad1 = utils.fgsm_attack(fwd, x, y, torch.zeros_like(x), eps, cfg.fgsm_alpha * eps, cfg.clamp_grad)
    eta = utils.uniform_delta(x, eps)
    grad2, _ = utils.input_grad(fwd, x, y, eta, create_graph=True)
    reg = utils.grad_align_reg(grad1, grad2, cfg.grad_align_cos_lambda)
    ce = F.cross_entropy(fwd(x + delta), y)
    params = [p for p in model.parameters() if p.requires_grad]
    scale = scaler.scale(torch.ones((), device=device)) if scaler.is_enabled() else torch.ones((), device=device)

    def param_grad(loss: torch.Tensor) -> torch.Tensor:
        if not loss.requires_grad:  # no graph reaches the weights
            return torch.zeros(sum(p.numel() for p in params), device=device)
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True, retain_graph=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g / scale).flatten().float()
                          for g, p in zip(grads, params)])
    return {"grad1": grad1.detach(), "grad2": grad2.detach(), "cos_x_eta": utils.per_example_cos(grad1, grad2).detach(),
            "reg": reg.detach(), "reg_grad": param_grad(reg), "ce_grad": param_grad(ce),
            "redos": precision.take_fp32_redos(fwd)}


def agreement_one(model_name: str, batch_size: int, device: torch.device) -> dict:
    model = build(model_name, device).train()
    x, y = synthetic_batch(model_name, batch_size, device)
    out = {}
    for half in (False, True):
        clone = copy.deepcopy(model)  # the same weights and BatchNorm statistics for both
        cfg = config_for(model_name, AGREEMENT_METHOD, batch_size, device, half)
        torch.manual_seed(1)  # the same eta
        out[half] = gradalign_pieces(clone, x, y, cfg, device)
    p32, p16 = out[False], out[True]
    lim = AGREEMENT_LIMITS
    ratio = float(p16["reg_grad"].norm() / p32["reg_grad"].norm()) if float(p32["reg_grad"].norm()) > 0 else math.nan
    values = {
        "cos_grad1": cos(p16["grad1"], p32["grad1"]), "cos_grad2": cos(p16["grad2"], p32["grad2"]),
        "cos_reg_param_grad": cos(p16["reg_grad"], p32["reg_grad"]), "reg_param_grad_norm_ratio": ratio,
        "cos_x_eta_fp32": float(p32["cos_x_eta"].mean()), "cos_x_eta_fp16": float(p16["cos_x_eta"].mean()),
        "reg_fp32": float(p32["reg"]), "reg_fp16": float(p16["reg"]),
        # for the record: the whole update's cosine, which cross-entropy dominates
        "cos_update": cos(p16["reg_grad"] + p16["ce_grad"], p32["reg_grad"] + p32["ce_grad"]),
        "reg_share_of_update_norm": float(p32["reg_grad"].norm() / (p32["reg_grad"] + p32["ce_grad"]).norm()),
        "fp32_redone_passes": p16["redos"]}
    diff = abs(values["cos_x_eta_fp16"] - values["cos_x_eta_fp32"])
    lo, hi = lim["reg_param_grad_norm_ratio"]
    checks = [
        check("reg_param_grad_finite", bool(torch.isfinite(p16["reg_grad"]).all()),
              bool(torch.isfinite(p16["reg_grad"]).all()), "all finite"),
        check("cos_grad1", values["cos_grad1"], values["cos_grad1"] >= lim["cos_grad1_min"],
              f">= {lim['cos_grad1_min']}"),
        check("cos_grad2", values["cos_grad2"], values["cos_grad2"] >= lim["cos_grad2_min"],
              f">= {lim['cos_grad2_min']}"),
        check("cos_reg_param_grad", values["cos_reg_param_grad"],
              values["cos_reg_param_grad"] >= lim["cos_reg_param_grad_min"], f">= {lim['cos_reg_param_grad_min']}"),
        check("reg_param_grad_norm_ratio", ratio, lo <= ratio <= hi, f"in [{lo}, {hi}]"),
        check("cos_x_eta_abs_diff", diff, diff <= lim["cos_x_eta_abs_diff_max"], f"<= {lim['cos_x_eta_abs_diff_max']}"),
    ]
    return {"model": model_name, "batch_size": batch_size, **values, "checks": checks}


def part_agreement(sizes: Sizes, device: torch.device) -> dict:
    rows = [agreement_one(m, sizes.agreement_batch, device) for m in sizes.agreement_models]
    for r in rows:
        print(f"  {r['model']} batch {r['batch_size']}: cos fp16/fp32 grad1 {r['cos_grad1']:.5f}, grad2 "
              f"{r['cos_grad2']:.5f}, GradAlign's parameter gradient {r['cos_reg_param_grad']:.4f} (norm ratio "
              f"{r['reg_param_grad_norm_ratio']:.3f}; whole update {r['cos_update']:.5f}), cos_x_eta "
              f"{r['cos_x_eta_fp16']:.4f} vs {r['cos_x_eta_fp32']:.4f}")
    return {"models": rows, "limits": AGREEMENT_LIMITS, "checks": [c | {"model": r["model"]} for r in rows
                                                                   for c in r["checks"]]}


# ---------------------------------------------------------------------------------- 2. underflow
def zero_input_gradients(model_name: str, batch_size: int, device: torch.device,
                         margins: tuple[float, ...] = (10.0, 15.0, 20.0, 25.0)) -> list[dict]:
    """Fraction of examples whose input gradient (at x, summed cross-entropy) is all zero, in eval
    mode, on a model made confident: labels are its own predictions, and its last layer is scaled so
    that the median logit margin is each of `margins` nats. fp32; float16 without and with the
    scaling train.py applies (scale 2^16 on the batch mean, a fresh GradScaler's); bfloat16."""
    model = build(model_name, device).eval()
    x, _ = synthetic_batch(model_name, batch_size, device)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    weight, bias = last.weight.detach().clone(), last.bias.detach().clone()
    with torch.no_grad():
        top2 = model(x).topk(2, 1).values
        base = (top2[:, 0] - top2[:, 1]).median()
    zero = torch.zeros_like(x)
    forwards = {"fp32": model,
                "fp16_unscaled": precision.Autocast(model, device.type, torch.float16, scale_input_grads=False),
                "fp16_scaled": precision.Autocast(model, device.type, torch.float16),
                "bf16": precision.Autocast(model, device.type, torch.bfloat16)}
    rows = []
    for margin in margins:
        with torch.no_grad():
            last.weight.copy_(weight * margin / base)
            last.bias.copy_(bias * margin / base)
            logits = model(x)
            y = logits.argmax(1)
            top2 = logits.topk(2, 1).values
        row = {"median_margin_nats": float((top2[:, 0] - top2[:, 1]).median())}
        for name, fwd in forwards.items():
            g, _ = utils.input_grad(fwd, x, y, zero)
            row[name] = float((g.flatten(1) == 0).all(1).float().mean())
        row["fp32_redone_passes"] = precision.take_fp32_redos(forwards["fp16_scaled"])
        rows.append(row)
    return rows


def part_underflow(sizes: Sizes, device: torch.device) -> dict:
    out = {"batch_size": sizes.underflow_batch, "mode": "eval", "models": {}, "checks": []}
    for m in sizes.underflow_models:
        rows = out["models"][m] = zero_input_gradients(m, sizes.underflow_batch, device)
        for r in rows:
            print(f"  {m}, median margin {r['median_margin_nats']:.0f} nats: all-zero input gradients fp32 "
                  f"{r['fp32']:.1%}, fp16 unscaled {r['fp16_unscaled']:.1%}, fp16 scaled {r['fp16_scaled']:.1%}, "
                  f"bf16 {r['bf16']:.1%}")
        # The fractions are the measurement. What must hold on any model: the scaling only adds
        # headroom. (fp32 is not always 0: an untrained model's margins spread far beyond the median,
        # and past about 100 nats even fp32's softmax rounds to exactly one-hot.)
        out["checks"].append(
            check("scaling_never_adds_zeros", [r["fp16_scaled"] - r["fp16_unscaled"] for r in rows],
                  all(r["fp16_scaled"] <= r["fp16_unscaled"] for r in rows), "scaled <= unscaled") | {"model": m})
    return out


# --------------------------------------------------------------------------------------- 3. cost
def memory_reset(device: torch.device) -> None:
    timing.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peaks(device: torch.device) -> dict:
    """Peak allocated and reserved (what nvidia-smi and an out-of-memory error see) MiB since the reset."""
    if device.type != "cuda":
        return {"peak_allocated_mib": None, "peak_reserved_mib": None}
    return {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}


def synthetic_split(n: int, shape, seed: int = 0) -> data.Split:
    gen = torch.Generator().manual_seed(seed)
    return data.Split(images=torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen),
                      labels=torch.randint(0, N_CLASSES, (n,), generator=gen), scale=255.0)


def epoch_cost(model_name: str, method: str, sizes: Sizes, device: torch.device) -> dict:
    """One full training epoch of train.train_step under --half_prec (float16) on synthetic images
    held on the device and cropped and flipped there, after untimed warm-up steps (cuDNN autotuning);
    steps skipped by the GradScaler and fp16 passes redone in fp32 are counted."""
    torch.manual_seed(0)
    shape = timing.INPUT_SHAPES[model_name]
    cfg = config_for(model_name, method, sizes.cost_batch, device, half=True)
    batches = data.Batches(synthetic_split(sizes.cost_images, shape), sizes.cost_batch, shuffle=True,
                           drop_last=True, crop_padding=4, hflip=True, device=device, store_on_device=True,
                           generator=torch.Generator(device=device).manual_seed(0))
    model = build(model_name, device).train()
    opt = train.make_optimizer(cfg, model)
    scaler = scaler_for(cfg, device)
    fwd = precision.forward_model(cfg, model, device, scaler)
    st, stats = train.StepState(), train.Stats(device)
    for i, (x, y) in enumerate(batches):
        if i == sizes.cost_warmup_steps:
            break
        train.train_step(fwd, opt, scaler, x, y, cfg, st, stats, update=True)
    precision.take_fp32_redos(fwd)
    skipped = torch.zeros((), device=device)
    memory_reset(device)
    start = time.perf_counter()
    steps = 0
    for i, (x, y) in enumerate(batches):
        opt.param_groups[0]["lr"] = train.lr_at((i + 1) / len(batches), "cyclic", cfg.lr_max, SWEEP["epochs"])
        train.train_step(fwd, opt, scaler, x, y, cfg, st, stats, update=True)
        skipped += st.skipped
        steps += 1
    timing.synchronize(device)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:  # the per-epoch resume.pt (weights, optimiser, scaler)
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}
        save_start = time.perf_counter()
        rundir.atomic_torch_save(state, os.path.join(tmp, rundir.RESUME_FILE))
        save_s = time.perf_counter() - save_start
    return {"method": timing.METHODS[method][0], "flags": timing.METHODS[method][1], "n_images": sizes.cost_images,
            "batch_size": sizes.cost_batch, "steps": steps, "seconds_per_epoch": seconds,
            "images_per_s": steps * sizes.cost_batch / seconds, **memory_peaks(device),
            "skipped_steps": int(skipped), "fp32_redone_passes": precision.take_fp32_redos(fwd),
            "resume_save_s": save_s, "train_loss": stats.means()["train_loss"]}


def periodic_cost(model_name: str, sizes: Sizes, device: torch.device) -> dict:
    """One periodic evaluation as train.py makes it under --half_prec with GradAlign (float16, fp32
    BatchNorm): the test subset at the sweep's evaluation batch, the training subset at its training
    batch; timed after one untimed run (cuDNN autotuning), with its peak memory."""
    shape = timing.INPUT_SHAPES[model_name]
    cfg = config_for(model_name, "gradalign", sizes.cost_batch, device, half=True,
                     extra=("--n_eval_every_k_iter", str(sizes.periodic_points),
                            "--batch_size_eval", str(sizes.final_batch)))
    model = build(model_name, device)
    fwd = precision.forward_model(cfg, model, device, scaler_for(cfg, device))
    split = synthetic_split(sizes.periodic_points, shape)
    loaders = types.SimpleNamespace(
        test_subset=data.Batches(split, cfg.batch_size_eval, shuffle=False, drop_last=False, device=device),
        train_subset=data.Batches(split, cfg.batch_size, shuffle=False, drop_last=True, device=device))
    train.periodic_evaluation(model, fwd, loaders, cfg)
    memory_reset(device)
    start = time.perf_counter()
    train.periodic_evaluation(model, fwd, loaders, cfg)
    timing.synchronize(device)
    return {"n_points": sizes.periodic_points, "batch_size_eval": cfg.batch_size_eval,
            "seconds": time.perf_counter() - start, **memory_peaks(device)}


def final_eval_cost(model_name: str, sizes: Sizes, device: torch.device) -> dict:
    """The final evaluation's PGD-50-10 as train.py runs it (fp32, eval mode), on final_points
    synthetic points whose labels are the model's own predictions at eps 0: no example is ever fooled, so every restart
    attacks every point at the full batch (the most passes, and no new batch size to autotune). One
    restart is timed after an untimed one; a full evaluation is 10 of them plus cos_x_eta's passes."""
    shape = timing.INPUT_SHAPES[model_name]
    model = build(model_name, device).float().eval()
    x = torch.rand(sizes.final_points, *shape, device=device)
    with torch.no_grad():
        y = torch.cat([model(part).argmax(1) for part in x.split(sizes.final_batch)])
    batches = list(zip(x.split(sizes.final_batch), y.split(sizes.final_batch)))
    utils.seeded_robust_accuracy(model, batches, 0.0, sizes.final_steps, 1, seed=0)
    memory_reset(device)
    start = time.perf_counter()
    result = utils.seeded_robust_accuracy(model, batches, 0.0, sizes.final_steps, 1, seed=0)
    timing.synchronize(device)
    restart_s = time.perf_counter() - start
    peaks = memory_peaks(device)
    start = time.perf_counter()
    utils.cos_x_eta(model, batches, 8 / 255, "zero")
    timing.synchronize(device)
    cos_s = time.perf_counter() - start
    n_iters, n_restarts = 50, 10
    per_step = restart_s / sizes.final_steps
    return {"n_points": sizes.final_points, "batch_size_eval": sizes.final_batch, "timed_steps": sizes.final_steps,
            "robust_acc_at_eps_0": result.pgd_acc, "restart_s": restart_s, "cos_x_eta_s": cos_s,
            "pgd_50_10_s": per_step * n_iters * n_restarts + cos_s, **peaks,
            "note": f"PGD-{n_iters}-{n_restarts} with every example robust; a trained model's fooled examples "
                    "leave the batch, which shortens it"}


def projection(epoch: dict, periodic: dict, final: dict) -> dict:
    """Wall time of a 30-epoch CIFAR-10 run with the sweep's settings: the epochs (plus epoch 0's one
    step, left out), a periodic evaluation at iterations 0, 200, ... of the 1 + 30 x 390, a resume.pt
    save per epoch, and the final evaluation of each weights evaluated."""
    steps_per_epoch = SWEEP["n_train"] // SWEEP["batch_size"]
    iterations = 1 + SWEEP["epochs"] * steps_per_epoch
    n_periodic = (iterations - 1) // SWEEP["eval_iter_freq"] + 1
    train_s = SWEEP["epochs"] * epoch["seconds_per_epoch"] * steps_per_epoch / epoch["steps"]
    parts = {"train_s": train_s, "periodic_evaluations": n_periodic,
             "periodic_evaluations_s": n_periodic * periodic["seconds"],
             "resume_saves_s": SWEEP["epochs"] * epoch["resume_save_s"],
             "final_evaluations": SWEEP["final_evaluations"],
             "final_evaluations_s": SWEEP["final_evaluations"] * final["pgd_50_10_s"]}
    total = parts["train_s"] + parts["periodic_evaluations_s"] + parts["resume_saves_s"] + parts["final_evaluations_s"]
    return {**parts, "total_minutes": total / 60}


def part_cost(sizes: Sizes, device: torch.device) -> dict:
    m = sizes.cost_model
    epochs = {}
    for method in COST_METHODS:
        e = epochs[method] = epoch_cost(m, method, sizes, device)
        print(f"  {e['method']}: {e['seconds_per_epoch']:.1f} s per epoch of {e['n_images']} images "
              f"({e['images_per_s']:.0f} images/s), peak {fmt_mib(e)}, {e['skipped_steps']} skipped steps, "
              f"{e['fp32_redone_passes']} fp32 redos")
    periodic = periodic_cost(m, sizes, device)
    print(f"  periodic evaluation: {periodic['seconds']:.2f} s, peak {fmt_mib(periodic)}")
    final = final_eval_cost(m, sizes, device)
    print(f"  final PGD-50-10 on {final['n_points']} points at batch {final['batch_size_eval']}: "
          f"{final['pgd_50_10_s']:.0f} s with every example robust, peak {fmt_mib(final)}")
    projections = {method: projection(e, periodic, final) for method, e in epochs.items()}
    for method, p in projections.items():
        print(f"  projected 30-epoch CIFAR-10 run, {epochs[method]['method']}: {p['total_minutes']:.1f} min "
              f"(training {p['train_s'] / 60:.1f}, {p['periodic_evaluations']} periodic evaluations "
              f"{p['periodic_evaluations_s'] / 60:.1f}, {p['final_evaluations']} final PGD-50-10 at most "
              f"{p['final_evaluations_s'] / 60:.1f})")
    checks = [check(f"{method}_epoch_finite", e["train_loss"], math.isfinite(e["train_loss"]), "finite training loss")
              for method, e in epochs.items()]
    return {"model": m, "sweep": SWEEP, "epochs": epochs, "periodic_evaluation": periodic, "final_evaluation": final,
            "projection": projections, "checks": checks}


def fmt_mib(r: dict) -> str:
    if r["peak_allocated_mib"] is None:
        return "- (CPU)"
    return f"{r['peak_allocated_mib']:.0f} MiB allocated / {r['peak_reserved_mib']:.0f} MiB reserved"


# ----------------------------------------------------------------------------------- 4. real run
def run_quick_start(extra: list[str], out_dir: str) -> dict:
    """train.main on the quick-start recipe plus `extra`, quietly; its final.json and the sums of
    its metrics.jsonl's fp16 counters."""
    argv = [*recipe_words(QUICK_START), *extra, "--out_dir", out_dir]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} exited with {code}: {err.getvalue().strip()[-500:]}")
    cfg, defaults = train.parse_config(argv)
    run_dir = os.path.join(out_dir, train.run_name(cfg, defaults))
    records = rundir.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "final.json")) as f:
        final = json.load(f)
    return {"argv": argv, "final": final, "skipped_steps": sum(r.get("skipped_steps", 0) for r in records),
            "fp32_redone_passes": sum(r.get("fp32_redone_passes", 0) for r in records)}


def part_real_run(sizes: Sizes, device: torch.device, cpu_reference: str | None) -> dict:
    extra = list(sizes.real_run_extra)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        half = run_quick_start([*extra, "--device", str(device), "--half_prec", "--half_prec_dtype", "float16"],
                               os.path.join(tmp, "fp16"))
        half_s = time.perf_counter() - start
        if cpu_reference is None:
            start = time.perf_counter()
            ref = run_quick_start([*extra, "--device", "cpu"], os.path.join(tmp, "fp32"))["final"]
            ref_source, ref_s = "run here, fp32 on the CPU", time.perf_counter() - start
        else:
            ref, ref_source, ref_s = rundir.read_json(cpu_reference), cpu_reference, 0.0
    got, want = half["final"]["last"], ref["last"]
    checks = [check(k, {"fp16": got[k], "fp32_cpu": want[k]}, abs(got[k] - want[k]) <= tol, f"|difference| <= {tol}")
              for k, tol in REAL_RUN_TOLERANCE.items()]
    print(f"  quick start in float16 on {device}: clean {got['clean_acc']:.2%}, PGD-50-10 {got['pgd_acc']:.2%}, "
          f"cos_x_eta {got['cos_x_eta']:.3f} ({half_s:.0f} s); fp32 on the CPU: clean {want['clean_acc']:.2%}, "
          f"PGD-50-10 {want['pgd_acc']:.2%}, cos_x_eta {want['cos_x_eta']:.3f}")
    return {"recipe": half["argv"], "fp16": half["final"], "fp16_seconds": half_s,
            "skipped_steps": half["skipped_steps"], "fp32_redone_passes": half["fp32_redone_passes"],
            "reference": ref, "reference_source": ref_source, "reference_seconds": ref_s,
            "tolerance": REAL_RUN_TOLERANCE, "checks": checks}


# ------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict:
    env = timing.environment(device)
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        env.update(cuda_build=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   memory_total_mib=total / 2**20)
    return env


def run_parts(parts: list[str], sizes: Sizes, device: torch.device, out: str, cpu_reference: str | None) -> dict:
    runners: dict[str, Callable[[], dict]] = {
        "agreement": lambda: part_agreement(sizes, device), "underflow": lambda: part_underflow(sizes, device),
        "cost": lambda: part_cost(sizes, device), "real_run": lambda: part_real_run(sizes, device, cpu_reference)}
    report = {**environment(device), "sizes": asdict(sizes), "parts": {}, "passed": None}
    start = time.perf_counter()
    for name in PARTS:
        if name not in parts:
            continue
        print(f"{name}:")
        part_start = time.perf_counter()
        try:
            result = runners[name]()
            result["passed"] = all(c["passed"] for c in result["checks"])
        except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others' minutes
            traceback.print_exc()
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "checks": []}
        result["seconds"] = time.perf_counter() - part_start
        report["parts"][name] = result
        report["passed"] = all(p["passed"] for p in report["parts"].values())
        report["wall_seconds"] = time.perf_counter() - start
        rundir.atomic_write_json(out, report)
        failed = [c["check"] + (f" ({c['model']})" if "model" in c else "")
                  for c in result["checks"] if not c["passed"]]
        verdict = "passed" if result["passed"] else "FAILED: " + (", ".join(failed) or result.get("error", ""))
        print(f"{name}: {verdict} ({result['seconds']:.0f} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.cpu_reference is not None and not os.path.isfile(args.cpu_reference):
        parser.error(f"--cpu_reference {args.cpu_reference}: no such file; give a quick-start run's final.json")
    try:
        device = precision.resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "auto":
        print(precision.device_choice("gpu_check.py", device, True, torch.float16))
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        report = run_parts(args.parts, sizes, device, args.out, args.cpu_reference)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
    print(f"wrote {args.out}: {'every check passed' if report['passed'] else 'a check FAILED'} "
          f"({report.get('wall_seconds', 0):.0f} s)")
    return 0 if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
