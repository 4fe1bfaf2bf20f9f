"""How the model runs on the machine: the device (--device, TF32), the precision (autocast, loss
scaling, the GradScaler step and the finite checks of train.py's --half_prec) and the memory layout
(--channels_last). Only this file defines autocast; utils.py's attacks call through its Autocast wrapper.

train.py's training precision: the forward model (fp32, or Autocast under --half_prec), the optimiser
step through the GradScaler, and FiniteGuard, which keeps float16's skipped steps, stops a run after
MAX_SKIPPED_IN_A_ROW of them and checks that losses and weights stay finite. eval.py, bench.py and
gpu_check.py use the device, autocast and layout parts too.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re

import torch
from torch import nn

# -------------------------------------------------------------------------------------- autocast
HALF_PREC_DTYPES = ("auto", "float16", "bfloat16")
INIT_LOSS_SCALE = 2.0 ** 16  # the initial dynamic loss scale of apex (the authors' code) and of torch's GradScaler


def autocast_dtype(device_type: str, choice: str = "auto") -> torch.dtype:
    """The dtype of --half_prec: 'auto' is float16 on CUDA and bfloat16 on the CPU."""
    if choice == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if choice not in HALF_PREC_DTYPES:
        raise ValueError(f"unknown half-precision dtype '{choice}': choose one of {', '.join(HALF_PREC_DTYPES)}")
    return getattr(torch, choice)


def _input_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() for a in args)


class Autocast(nn.Module):
    """Runs the wrapped model's forward under torch.autocast and returns fp32 logits.

    dtype: float16 or bfloat16 (default: float16 on CUDA, bfloat16 on the CPU, so the CPU exercises
    the same mixed-precision path; float16 on the CPU runs CUDA's numerics). Only forwards are
    autocast; backward passes (and double backprop) run outside it.
    batchnorm_fp32: every BatchNorm layer gets its input in fp32 and hands its output back in `dtype`
    (the authors' code registers batch_norm as an fp32 function with apex when GradAlign is on).
    Under float16, `input_grad` scales the loss of its passes by `input_grad_scale` (see there);
    `scaler` is the training GradScaler whose current scale that follows.
    """

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype | None = None, *,
                 scaler: torch.amp.GradScaler | None = None, batchnorm_fp32: bool = False,
                 scale_input_grads: bool = True):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype or autocast_dtype(device_type)
        self.scaler = scaler
        self.scale_input_grads = scale_input_grads and self.dtype == torch.float16
        self.norms = ([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                      if batchnorm_fp32 else [])
        self.fp32_redos = 0  # float16 input-gradient passes redone in fp32 (input_grad), a host int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype), self._batchnorm_in_fp32():
            return self.model(x).float()

    @contextlib.contextmanager
    def _batchnorm_in_fp32(self):
        """Hooks that live for one forward only, so the model itself is left unchanged."""
        def output_to_dtype(module, args, out):
            return out.to(self.dtype)
        handles = []
        for m in self.norms:
            handles += [m.register_forward_pre_hook(_input_to_fp32), m.register_forward_hook(output_to_dtype)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def input_grad_scale(self, batch_size: int, device: torch.device) -> torch.Tensor | float | None:
        """Factor of the summed loss in an input-gradient pass; None (no scaling) unless float16.

        The authors' code scaled every input-gradient pass's batch-MEAN loss by apex's dynamic loss
        scale; scale / batch_size times the summed loss is the same number. The scale is the
        training GradScaler's current one (read on the device, no host sync), or its initial 2^16
        where there is no enabled scaler (eval.py, bench.py).
        """
        if not self.scale_input_grads:
            return None
        if self.scaler is not None and self.scaler.is_enabled():
            return self.scaler.scale(torch.ones((), device=device)) / batch_size
        return INIT_LOSS_SCALE / batch_size


def take_fp32_redos(model: nn.Module) -> int:
    """How many float16 input-gradient passes through `model` were redone in fp32 since the last
    call (0 unless it is an Autocast wrapper); resets the count."""
    if not isinstance(model, Autocast):
        return 0
    count, model.fp32_redos = model.fp32_redos, 0
    return count


# ---------------------------------------------------------------------------------------- device
def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, as one phrase with the versions torch can report
    (its build, the CUDA it was built for, the CUDA version the driver supports); None if it can."""
    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build: install a CUDA build of torch"
    build += f" is built for CUDA {torch.version.cuda}"
    try:
        torch.cuda.init()
        message = ""
    except Exception as exc:  # noqa: BLE001 - torch reports CUDA start-up failures as various exceptions
        message = str(exc)
    too_old = re.search(r"too old \(found version (\d+)\)", message)
    if too_old:
        found = int(too_old.group(1))  # the driver's CUDA version, 1000 * major + 10 * minor
        return (f"the NVIDIA driver is too old: it supports CUDA {found // 1000}.{found % 1000 // 10}, and {build} "
                "(update the driver, or install a torch built for an older CUDA)")
    if "no NVIDIA driver" in message or not message and torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"no NVIDIA GPU or driver found ({build}"
                + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
                + "; in Docker: docker run --gpus all)")
    reason = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return f"CUDA failed to start ({build}): {reason}"


def resolve_device(spec: str, gpu: int | None = None) -> torch.device:
    """'auto' -> cuda if available else cpu; --gpu N picks cuda:N. Raises ValueError (one line naming
    the cause, cuda_problem) for any other device (mps, meta, ...: the code runs on CPUs and CUDA
    GPUs only) and when CUDA is asked for and cannot be used: no silent CPU fallback."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise ValueError(f"--device {spec} is not supported: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        spec = f"cuda:{gpu or 0}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda" and gpu:
        spec = f"cuda:{gpu}"
    device = torch.device(spec)
    if device.type == "cuda":
        problem = cuda_problem()
        if problem:
            raise ValueError(f"--device {spec}: CUDA is not usable: {problem}; use --device cpu, or see docs/gpu.md")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible; pick another --gpu")
    return device


def precision_name(half_prec: bool, dtype: torch.dtype | None) -> str:
    """The precision of a run in words: fp32, or --half_prec's autocast dtype (float16 comes with
    loss scaling)."""
    if not half_prec or dtype is None:
        return "fp32"
    name = str(dtype).removeprefix("torch.")
    return f"{name} autocast" + (" with loss scaling" if dtype == torch.float16 else "")


def device_choice(prog: str, device: torch.device, half_prec: bool, dtype: torch.dtype | None) -> str:
    """The line a tool prints first under --device auto: the device and precision it chose (and why
    not CUDA, when a CUDA build of torch could not use it)."""
    why = ""
    if device.type == "cpu" and torch.version.cuda is not None:
        why = f" (CUDA not usable: {cuda_problem()})"
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{prog}: --device auto chose {device}{name}{why}; precision {precision_name(half_prec, dtype)}"


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, process-wide. Off means fp32 is IEEE fp32, as on
    the paper's pre-Ampere GPUs (PyTorch's own default lets cuDNN convolutions use TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def to_device(model: nn.Module, device: torch.device, *, tf32: bool = False, channels_last: bool = False
              ) -> nn.Module:
    """Moves the model, sets TF32 (off unless asked) and the layout of its weights (set_layout); on CUDA
    also cuDNN autotuning (speed only: the reference's cuDNN was not deterministic either)."""
    set_tf32(tf32)
    model = set_layout(model.to(device), channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


# ------------------------------------------------------------------------------------ memory layout
LAYOUT_CHOICES = ("auto", "on", "off")  # --channels_last: auto = LAYOUTS' choice per pass
LAYOUT_PASSES = ("train", "eval")  # the training step; the evaluation attacks (periodic and final, eval mode)

# channels_last (True) or contiguous (False) weights per device type, model and pass, chosen by
#     python bench.py --device cpu --parts layouts layout_agreement
# (bench.json's "layouts": every pass timed in both layouts, side by side; "layout_agreement": the
# final PGD-50-10's verdicts in both layouts). A pass switches to channels_last only where that was at
# least LAYOUT_MIN_GAIN faster and changed at most one verdict per thousand examples. ResNet-18's CPU
# evaluation was about 2x faster with channels_last but changed 2 verdicts of 1000 (random weights),
# so it stays contiguous (--channels_last on takes the faster layout). Training on the CPU stays
# contiguous: channels_last training would not repeat a contiguous run bit for bit. No GPU measurement
# yet: on CUDA every pass uses channels_last, the layout cuDNN's fast convolution kernels expect.
LAYOUT_MIN_GAIN = 1.1
LAYOUTS: dict[tuple[str, str], dict[str, bool]] = {
    ("cpu", "resnet18"): {"train": False, "eval": False},
    ("cpu", "cnn"): {"train": False, "eval": False},
    ("cpu", "cnn_bn"): {"train": False, "eval": False},
}


def pass_layouts(choice: str, device_type: str, model_name: str) -> dict[str, bool]:
    """Whether each pass ("train", "eval") runs with channels_last weights: --channels_last on/off for
    every pass; auto follows LAYOUTS (CUDA: channels_last; a pair not in the table: contiguous)."""
    if choice not in LAYOUT_CHOICES:
        raise ValueError(f"unknown layout choice '{choice}': choose one of {', '.join(LAYOUT_CHOICES)}")
    if choice != "auto":
        return dict.fromkeys(LAYOUT_PASSES, choice == "on")
    if device_type == "cuda":
        return dict.fromkeys(LAYOUT_PASSES, True)
    return dict(LAYOUTS.get((device_type, model_name), dict.fromkeys(LAYOUT_PASSES, False)))


def layout_names(layouts: dict[str, bool]) -> dict[str, str]:
    """{"train": "contiguous" or "channels_last", "eval": ...}: what config.json and final.json record."""
    return {p: "channels_last" if cl else "contiguous" for p, cl in layouts.items()}


def set_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model with its 4-d weights in channels_last or contiguous layout (in place, as Module.to)."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def input_layout(model: nn.Module) -> torch.memory_format:
    """The layout to give inputs: channels_last where a convolution weight is channels_last only (a
    weight with one input channel or a 1x1 kernel is both: it decides nothing, nor would its input)."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def layout_copy(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of `model` (an Autocast wrapper included; its GradScaler is shared, not copied) in the
    other layout: a periodic evaluation in another layout than training's converts once per evaluation."""
    scaler = getattr(model, "scaler", None)
    memo = {id(scaler): scaler} if scaler is not None else {}
    return set_layout(copy.deepcopy(model, memo), channels_last)


# --------------------------------------------------------------------------- training precision
MAX_SKIPPED_IN_A_ROW = 100  # float16: the run stops after this many consecutive skipped steps


class NonFiniteLoss(Exception):
    """The training loss or the weights became NaN or inf (train.py exits with EXIT_NONFINITE)."""


def half_prec_dtype(cfg, device: torch.device) -> torch.dtype:
    return autocast_dtype(device.type, cfg.half_prec_dtype)


def make_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """The training GradScaler: enabled under --half_prec with float16 (the authors' apex loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.half_prec and half_prec_dtype(cfg, device) == torch.float16)


def forward_model(cfg, model: nn.Module, device: torch.device, scaler: torch.amp.GradScaler) -> nn.Module:
    """The model every training and periodic-evaluation forward goes through: the model itself in
    fp32, or under --half_prec its Autocast wrapper (input-gradient passes scaled by the
    GradScaler's scale under float16; BatchNorm in fp32 when GradAlign is on, as in the authors' code)."""
    if not cfg.half_prec:
        return model
    return Autocast(model, device.type, half_prec_dtype(cfg, device), scaler=scaler,
                          batchnorm_fp32=cfg.grad_align_cos_lambda > 0)


def optimizer_step(opt, scaler: torch.amp.GradScaler, total: torch.Tensor) -> torch.Tensor:
    """Backward and optimiser step through the GradScaler. Returns, on the device (no host sync),
    1.0 if the step was skipped, else 0.0: with an enabled GradScaler (float16), as with the
    authors' apex, a step whose loss or gradients are not finite changes no weight and lowers
    the scale; without one (fp32, bf16) every step is taken."""
    if not scaler.is_enabled():
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        return torch.zeros((), device=total.device)
    one = torch.ones((), device=total.device)
    scale_before = scaler.scale(one)
    # A non-finite loss makes every gradient NaN (x 1.0 otherwise), so the GradScaler skips the step.
    guard = torch.where(torch.isfinite(total.detach()), 1.0, float("nan"))
    scaler.scale(total * guard).backward()
    scaler.step(opt)
    scaler.update()
    return (scaler.scale(one) < scale_before).float()  # the scale drops exactly when the step was skipped


class FiniteGuard:
    """The finite checks of a run, kept on the device (no host sync per step).

    float16 (an enabled GradScaler): steps skipped since the last metrics record, the current run of
    skipped steps, and -1 or the iteration where that run reached MAX_SKIPPED_IN_A_ROW. fp32 and bf16:
    -1 or the first iteration whose loss was not finite. Its state_dict is part of resume.pt.
    """
    KEYS = ("first_bad_iter", "skipped_steps", "skipped_in_a_row", "stalled_at")

    def __init__(self, scaling: bool, device: torch.device):
        self.scaling, self.device = scaling, device
        self.first_bad_iter = torch.tensor(-1, device=device)
        self.skipped_steps = torch.tensor(0, device=device)
        self.skipped_in_a_row = torch.tensor(0, device=device)
        self.stalled_at = torch.tensor(-1, device=device)

    def count(self, loss: torch.Tensor, skipped: torch.Tensor, iteration: int) -> None:
        """Bookkeeping of one step. float16: a non-finite step was skipped (skipped = 1.0) and counts;
        otherwise the first non-finite loss is remembered."""
        if self.scaling:
            skipped = skipped.long()
            self.skipped_steps = self.skipped_steps + skipped
            self.skipped_in_a_row = (self.skipped_in_a_row + 1) * skipped
            stalled = (self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW) & (self.stalled_at < 0)
            self.stalled_at = torch.where(stalled, iteration, self.stalled_at)
        else:
            self.first_bad_iter = torch.where(~torch.isfinite(loss) & (self.first_bad_iter < 0), iteration,
                                              self.first_bad_iter)

    def check(self, model: nn.Module, iteration: int) -> None:
        """Raises NonFiniteLoss (one host sync: the training work so far has finished): in fp32 and bf16
        after a non-finite loss; under float16 after MAX_SKIPPED_IN_A_ROW consecutive skipped steps;
        always when a weight is NaN or inf."""
        weights_ok = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        bad, stalled, ok = torch.stack([self.first_bad_iter, self.stalled_at, weights_ok.long()]).tolist()
        if bad >= 0:
            raise NonFiniteLoss(f"the training loss became NaN or inf at iteration {bad}; lower --lr_max (or "
                                "check the data)")
        if stalled >= 0:
            raise NonFiniteLoss(f"{MAX_SKIPPED_IN_A_ROW} steps in a row were skipped for a non-finite loss or "
                                f"gradients (up to iteration {stalled}); lower --lr_max or use --half_prec_dtype "
                                "bfloat16")
        if not ok:
            raise NonFiniteLoss(f"the weights became NaN or inf by iteration {iteration}; lower --lr_max")

    def take_skipped(self) -> int:
        """Steps skipped since the last call (one host sync)."""
        n = int(self.skipped_steps)
        self.skipped_steps = torch.zeros_like(self.skipped_steps)
        return n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state: dict) -> None:
        """first_bad_iter is required; a resume.pt without the float16 counters starts them afresh."""
        for k in self.KEYS:
            if k in state or k == "first_bad_iter":
                setattr(self, k, state[k].to(self.device))
