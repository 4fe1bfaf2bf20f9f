"""The training precision of train.py: the forward model (fp32, or utils.Autocast under --half_prec),
the optimiser step through the GradScaler, and FiniteGuard, which keeps float16's skipped steps, stops
a run after MAX_SKIPPED_IN_A_ROW of them and checks that losses and weights stay finite.

The autocast wrapper itself and the choice of dtype are in utils.py (eval.py and bench.py use them too).
"""
from __future__ import annotations

import torch
from torch import nn

import utils

MAX_SKIPPED_IN_A_ROW = 100  # float16: the run stops after this many consecutive skipped steps


class NonFiniteLoss(Exception):
    """The training loss or the weights became NaN or inf (train.py exits with EXIT_NONFINITE)."""


def half_prec_dtype(cfg, device: torch.device) -> torch.dtype:
    return utils.autocast_dtype(device.type, cfg.half_prec_dtype)


def make_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """The training GradScaler: enabled under --half_prec with float16 (the authors' apex loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.half_prec and half_prec_dtype(cfg, device) == torch.float16)


def forward_model(cfg, model: nn.Module, device: torch.device, scaler: torch.amp.GradScaler) -> nn.Module:
    """The model every training and periodic-evaluation forward goes through: the model itself in
    fp32, or under --half_prec its utils.Autocast wrapper (input-gradient passes scaled by the
    GradScaler's scale under float16; BatchNorm in fp32 when GradAlign is on, as in the authors' code)."""
    if not cfg.half_prec:
        return model
    return utils.Autocast(model, device.type, half_prec_dtype(cfg, device), scaler=scaler,
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
