"""Shared pieces: the box clamp, attacks, GradAlign, metrics, learning rates, precision and file I/O.

Units: every eps and step size here is in [0, 1] image units (the command line's 1/255 units are
converted once, in train.py and eval.py). Images are (B, C, H, W) tensors with values in [0, 1].
Attacks are pure functions of (model, x, y, ...): they never switch the model between train and
eval mode, and every delta they return satisfies |delta|_inf <= eps and 0 <= x + delta <= 1
(SPEC §3.1 item 6 records the one exception, random_corner, in train.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLAMP_RULES = ("zero", "half")


# ----------------------------------------------------------------------------------------- box clamp
def box_clamp(z: torch.Tensor, rule: str) -> torch.Tensor:
    """clamp(z, 0, 1) with the gradient rule of SPEC §3.0 at the bounds.

    rule='zero': gradient 0 where z is exactly 0 or 1 (PyTorch 1.4, the paper's runs).
    rule='half': gradient 0.5 there (the reference's max/min code on PyTorch >= 1.10).
    Both give gradient 1 inside (0, 1) and 0 outside [0, 1].
    """
    if rule == "zero":
        return torch.clamp(z, 0.0, 1.0)
    if rule == "half":
        return torch.clamp(z, z.new_zeros(()), z.new_ones(()))
    raise ValueError(f"unknown clamp rule '{rule}': choose one of {', '.join(CLAMP_RULES)}")


def project(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Projects delta onto the box (0 <= x + delta <= 1), then onto the L-inf ball of radius eps."""
    delta = torch.clamp(x + delta, 0.0, 1.0) - x
    return torch.clamp(delta, -eps, eps)


def uniform_delta(x: torch.Tensor, eps: float) -> torch.Tensor:
    """U[-eps, eps]^d noise shaped like x (not box-projected), from the global torch RNG."""
    return torch.empty_like(x).uniform_(-eps, eps)


# ------------------------------------------------------------------------------------ input gradients
def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *,
               clamp_rule: str | None = None, create_graph: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient wrt delta of the summed cross-entropy at model(x + delta), and the logits.

    The forward sees clamp(x + delta) under `clamp_rule`, or x + delta when it is None.
    The summed loss gives each example the gradient of its own loss (the reference's batch mean
    divides it by B: same signs and cosines, no fp16 underflow). create_graph keeps the graph
    for double backprop (GradAlign); otherwise the result is detached.
    """
    delta = delta.detach().requires_grad_(True) if not create_graph else delta.requires_grad_(True)
    inputs = x + delta if clamp_rule is None else box_clamp(x + delta, clamp_rule)
    logits = model(inputs)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta, create_graph=create_graph)
    return (grad if create_graph else grad.detach()), logits.detach()


def per_example_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matching examples of a and b, (B, ...) -> (B,); 1.0 where either is zero."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    nonzero = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / torch.where(nonzero, na * nb, torch.ones_like(na))
    return torch.where(nonzero, cos, torch.ones_like(cos))


def grad_align_reg(grad1: torch.Tensor, grad2: torch.Tensor, lam: float) -> torch.Tensor:
    """GradAlign: lam * (1 - mean_i cos(grad1_i, grad2_i)), a scalar tensor.

    grad1, grad2: input gradients (B, C, H, W) at x (or the attack's start) and at x + eta.
    The mean runs over the examples where both gradients are nonzero (no epsilon in the
    normalisation, as in the reference); it is NaN if there is none. Differentiable wherever the
    gradients carry a graph, with no host synchronisation.
    """
    g1, g2 = grad1.flatten(1).float(), grad2.flatten(1).float()
    sq1, sq2 = (g1 * g1).sum(1), (g2 * g2).sum(1)
    keep = (sq1 != 0) & (sq2 != 0)
    one = torch.ones_like(sq1)
    norms = torch.sqrt(torch.where(keep, sq1, one)) * torch.sqrt(torch.where(keep, sq2, one))
    cos = (g1 * g2).sum(1) / norms
    keep_f = keep.to(cos.dtype)
    mean_cos = (cos * keep_f).sum() / keep_f.sum()
    return lam * (1.0 - mean_cos)


# --------------------------------------------------------------------------------------------- attacks
def fgsm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta0: torch.Tensor, eps: float,
                step: float, clamp_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One FGSM step from delta0 (training: FGSM, FGSM-RS and Free-AT; SPEC §3.1 item 6).

    The gradient is taken at clamp(x + delta0) under `clamp_rule`; the step is step * sign(grad)
    (step = fgsm_alpha * eps), clipped to [-eps, eps] and projected onto the box.
    Returns (delta, grad at delta0), both detached.
    """
    grad, _ = input_grad(model, x, y, delta0, clamp_rule=clamp_rule)
    delta = torch.clamp(delta0.detach() + step * torch.sign(grad), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0) - x, grad


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
               n_iters: int, *, random_start: bool, clamp_rule: str | None = None) -> torch.Tensor:
    """L-inf PGD: n_iters sign-ascent steps of size alpha on the cross-entropy, one restart.

    Start: 0, or U[-eps, eps] (not box-projected before the first gradient). After each step:
    box, then eps-ball. The forward sees clamp(x + delta) under `clamp_rule` (training) or the raw
    x + delta (clamp_rule=None: evaluation). n_iters=0 returns zeros. Serves PGD training, the
    periodic evaluation (FGSM is n_iters=1, alpha=eps, zero start) and the final evaluation.
    """
    if n_iters == 0:
        return torch.zeros_like(x)
    delta = uniform_delta(x, eps) if random_start else torch.zeros_like(x)
    for _ in range(n_iters):
        grad, _ = input_grad(model, x, y, delta, clamp_rule=clamp_rule)
        delta = project(x, delta.detach() + alpha * torch.sign(grad), eps)
    return delta


@dataclass
class RobustEval:
    """Outcome of robust_accuracy: fractions in [0, 1] and the attack's cost."""
    clean_acc: float
    pgd_acc: float
    n_eval: int
    grad_passes: int  # forward+backward passes, counted per example


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float,
                    alpha: float, n_iters: int, n_restarts: int, progress: Callable | None = None
                    ) -> RobustEval:
    """Clean and PGD-`n_iters`-`n_restarts` accuracy (the final evaluation, SPEC §3.1 item 12).

    An example counts as robust only if it is classified correctly clean and at every iterate
    (after the first step) and final point of every restart. That rule is at least as strong as
    the reference's (which keeps the max-loss restart), so it may stop early: an example already
    broken gets no more steps or restarts. Each restart draws its random start for the whole batch,
    so every example follows the same trajectory as in a plain full-batch PGD.
    The caller puts the model in eval mode and fp32.
    """
    n_clean = n_robust = n_total = passes = 0
    for x, y in batches:
        robust = _predict(model, x) == y
        n_clean += int(robust.sum())
        for _ in range(n_restarts):
            start = uniform_delta(x, eps) if n_iters > 0 else torch.zeros_like(x)  # as pgd_attack
            active = robust.nonzero().squeeze(1)
            if active.numel() == 0:
                continue
            xa, ya, delta = x[active], y[active], start[active]
            fooled = torch.zeros_like(ya, dtype=torch.bool)
            for step in range(n_iters):
                live = (~fooled).nonzero().squeeze(1)
                passes += live.numel()
                grad, logits = input_grad(model, xa[live], ya[live], delta[live])
                if step > 0:  # logits at a feasible point (the start is not box-projected)
                    fooled[live] |= logits.argmax(1) != ya[live]
                delta[live] = project(xa[live], delta[live] + alpha * torch.sign(grad), eps)
            fooled |= _predict(model, xa + delta) != ya
            robust[active[fooled]] = False
        n_robust += int(robust.sum())
        n_total += len(y)
        if progress is not None:
            progress(len(y))
    return RobustEval(n_clean / n_total, n_robust / n_total, n_total, passes)


def seeded_robust_accuracy(model: nn.Module, batches, eps: float, n_iters: int, n_restarts: int, seed: int,
                           progress: Callable | None = None) -> RobustEval:
    """robust_accuracy with step eps/4 from a freshly seeded RNG: train.py's final evaluation and
    eval.py give the same numbers for the same points, batch size, seed and device."""
    torch.manual_seed(seed)
    return robust_accuracy(model, batches, eps, eps / 4, n_iters, n_restarts, progress)


# ----------------------------------------------------------------------------- periodic evaluation
def _accuracy_and_deltas(model, batches, eps, alpha, n_iters, random_start):
    correct, n, deltas = 0, 0, []
    for x, y in batches:
        delta = pgd_attack(model, x, y, eps, alpha, n_iters, random_start=random_start)
        correct += int((_predict(model, x + delta) == y).sum())
        n += len(y)
        deltas.append(delta)
    return correct / max(n, 1), deltas


def _grads(model, batches, eps, clamp_rule, at_random_point):
    grads = []
    for x, y in batches:
        delta = uniform_delta(x, eps) if at_random_point else torch.zeros_like(x)
        grads.append(input_grad(model, x, y, delta, clamp_rule=clamp_rule)[0])
    return grads


def _mean_cos(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    cos = torch.cat([per_example_cos(a, b) for a, b in zip(first, second)])
    return float(cos.mean()) if cos.numel() else float("nan")


def periodic_metrics(model: nn.Module, test_batches, train_batches, eps: float, alpha: float,
                     attack_iters: int, clamp_rule: str) -> dict[str, float]:
    """The reference's periodic evaluation (SPEC §3.1 item 9), in its order of random draws.

    Test subset: clean, FGSM (one step of eps from zero) and PGD-`attack_iters` (step alpha, one
    random restart) accuracy, and cos_fgsm_pgd between their deltas; training subset: PGD accuracy
    (for early stopping); then cos_x_eta between input gradients at clamp(x) and clamp(x + eta).
    The caller sets eval mode (and the training precision).
    """
    test_clean, _ = _accuracy_and_deltas(model, test_batches, eps, alpha, 0, True)
    test_fgsm, fgsm_deltas = _accuracy_and_deltas(model, test_batches, eps, eps, 1, False)
    test_pgd, pgd_deltas = _accuracy_and_deltas(model, test_batches, eps, alpha, attack_iters, True)
    train_pgd, _ = _accuracy_and_deltas(model, train_batches, eps, alpha, attack_iters, True)
    grad_x = _grads(model, test_batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, test_batches, eps, clamp_rule, at_random_point=True)
    return {"test_clean_acc": test_clean, "test_fgsm_acc": test_fgsm, "test_pgd_acc": test_pgd,
            "train_pgd_acc": train_pgd, "cos_x_eta": _mean_cos(grad_x, grad_eta),
            "cos_fgsm_pgd": _mean_cos(fgsm_deltas, pgd_deltas)}


def cos_x_eta(model: nn.Module, batches, eps: float, clamp_rule: str) -> float:
    """Mean cosine between input gradients at clamp(x) and clamp(x + eta), eta ~ U[-eps, eps]^d."""
    grad_x = _grads(model, batches, eps, clamp_rule, at_random_point=False)
    grad_eta = _grads(model, batches, eps, clamp_rule, at_random_point=True)
    return _mean_cos(grad_x, grad_eta)


# --------------------------------------------------------------------------------- learning rate
def lr_at(t: float, schedule: str, lr_max: float, epochs: int) -> float:
    """Learning rate at fractional epoch t (t = epoch - 1 + (i + 1) / len(loader); SPEC §3.1 item 3).

    cyclic: linear 0 -> lr_max at floor(2E/5) epochs -> 0 at E (0 for t <= 0).
    piecewise: lr_max, then /10 from t/E >= 0.5 and /100 from t/E >= 0.75.
    """
    if schedule == "cyclic":
        return float(np.interp([t], [0, epochs * 2 // 5, epochs], [0, lr_max, 0])[0])
    if schedule == "piecewise":
        frac = t / epochs
        return lr_max if frac < 0.5 else lr_max / 10 if frac < 0.75 else lr_max / 100
    raise ValueError(f"unknown lr schedule '{schedule}'")


# ------------------------------------------------------------------------------------- precision
class Autocast(nn.Module):
    """Runs the wrapped model's forward under torch.autocast and returns fp32 logits.

    float16 on CUDA, bfloat16 on the CPU, so the CPU exercises the same mixed-precision path.
    Only forwards are autocast; backward passes (and double backprop) run outside it.
    """

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = torch.float16 if device_type == "cuda" else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def resolve_device(spec: str, gpu: int | None = None) -> torch.device:
    """'auto' -> cuda if available else cpu; --gpu N picks cuda:N. Raises ValueError without CUDA."""
    if spec == "auto":
        spec = f"cuda:{gpu or 0}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda" and gpu:
        spec = f"cuda:{gpu}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec} asked for CUDA, but this machine has none; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible; pick another --gpu")
    return device


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Moves the model; on CUDA also channels_last weights and cuDNN autotuning (speed only: the
    reference's cuDNN was not deterministic either)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------- file I/O
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes data to a temporary file beside path, then renames it over path.

    The temporary file is created with mode 0o666 and the process umask applied by the kernel, so the
    result has the mode a plain open(path, "w") would give (group-readable under umask 022)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temporary file and a rename: a killed run never leaves a torn file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_jsonl(path: str) -> list[dict]:
    """The whole lines of a JSON-lines file (a torn last line is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def append_jsonl(path: str, obj: dict) -> None:
    """Appends one whole line in a single write call."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def truncate_jsonl(path: str, n_lines: int) -> None:
    """Keeps the first n_lines whole lines (drops lines written after a checkpoint and torn ones)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.endswith("\n")][:n_lines]
    atomic_write_bytes(path, "".join(lines).encode())


# A run directory's lock is a lease: its owner refreshes the lock file's mtime every HEARTBEAT_SECONDS
# (at most a fifth of the lease), and a lock not refreshed for LEASE_SECONDS is stale and may be taken
# over from any host. The lease must outlast the longest stall of a live owner (a slow file system,
# a suspended job): a live run whose lock is taken over notices it at its next refresh and stops.
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 60.0


class RunLocked(Exception):
    """Another live process holds the run's lock."""


@dataclass(frozen=True)
class LockOwner:
    """What a lock file says about its holder, and how long ago it was last refreshed."""
    host: str
    pid: int
    since: str          # when it took the lock, UTC (ISO 8601); "?" for a lock in the older 'host pid' form
    pid_ns: str | None  # its PID namespace ('pid:[4026531836]'), None when unknown
    age: float          # seconds since the lock file's mtime, by the clock given to read_lock

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}, refreshed {max(self.age, 0):.0f} s ago"

    def is_live(self) -> bool:
        """Refreshed within the lease, unless it names a process of this host's PID namespace that is gone
        (a local crash is then taken over at once; other hosts' runs wait for their lease to run out)."""
        if self.age >= LEASE_SECONDS:
            return False
        same_namespace = self.pid_ns is None or self.pid_ns == _pid_namespace()
        return not (self.host == socket.gethostname() and same_namespace and not _pid_exists(self.pid))


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str, now: float | None = None) -> tuple[LockOwner | None, int | None]:
    """(the owner named by the lock file, or None if it cannot be parsed; its inode, or None if there
    is no lock). `now` is the clock its age is measured against (default: this host's time)."""
    try:
        with open(path) as f:
            text = f.read()
            inode, mtime = os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, -1
    age = (time.time() if now is None else now) - mtime
    try:
        if text.startswith("{"):
            d = json.loads(text)
            return LockOwner(str(d["host"]), int(d["pid"]), str(d["since"]), d.get("pid_ns"), age), inode
        host, pid = text.split()
        return LockOwner(host, int(pid), "?", None, age), inode
    except (ValueError, KeyError, TypeError):
        return None, inode  # not a lock this code wrote: never taken for a live one


def live_lock_owner(run_dir: str) -> LockOwner | None:
    """The live holder of run_dir's lock, or None (no lock, or a stale or unreadable one). Reads only."""
    owner, _ = read_lock(os.path.join(run_dir, ".lock"))
    return owner if owner is not None and owner.is_live() else None


class RunLock:
    """An exclusive, cross-host lock on a run directory: the file run_dir/.lock, one line of JSON
    naming its holder (host, pid, since when), kept fresh by a daemon thread (see LEASE_SECONDS).

    on_lost: called from that thread if the lock was taken over (this process had stalled for longer
    than the lease); the caller should stop writing to the run directory.
    """

    def __init__(self, run_dir: str, on_lost: Callable[[], None] | None = None):
        self.path = os.path.join(run_dir, ".lock")
        self.on_lost = on_lost
        self.held = False
        self.inode: int | None = None
        self.text = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock or raises RunLocked (naming the holder).

        The lock is written in full beside its place and hard-linked there (atomic, fails if a lock
        exists), so a lock file always names its owner. A stale lock is first renamed aside (only one
        contender's rename succeeds); if what was renamed turns out to be a fresh lock, linked in the
        meantime by another contender, it is linked back and this contender gives up.
        """
        host, pid = socket.gethostname(), os.getpid()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mine = f"{self.path}.{host}.{pid}"
        self.text = json.dumps({"host": host, "pid": pid, "since": since, "pid_ns": _pid_namespace()}) + "\n"
        with open(mine, "w") as f:
            f.write(self.text)
        try:
            for _ in range(3):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    # the age is measured against our own file's mtime: the file server's clock, not this host's
                    owner, inode = read_lock(self.path, now=os.stat(mine).st_mtime)
                    if owner is not None and owner.is_live():
                        raise RunLocked(owner.describe()) from None
                    if inode == -1:
                        raise RunLocked(f"its lock {self.path} exists but this user cannot read it") from None
                    if inode is not None:
                        self._set_aside(inode, f"{self.path}.stale.{host}.{pid}")
                    continue
                self.inode = os.stat(self.path).st_ino
                self.held = True
                self._start_heartbeat()
                return
            raise RunLocked("other processes were taking the lock at the same moment")
        finally:
            os.remove(mine)

    def _set_aside(self, stale_inode: int, aside: str) -> None:
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            if os.stat(aside).st_ino != stale_inode:  # a fresh lock replaced the stale one meanwhile
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            os.remove(aside)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = min(HEARTBEAT_SECONDS, LEASE_SECONDS / 5)
        while not self._stop.wait(interval):
            try:
                if not self._is_mine():
                    raise FileNotFoundError(self.path)
                os.utime(self.path)
            except FileNotFoundError:
                if self._stop.is_set():
                    return
                self.held = False
                if self.on_lost is not None:
                    self.on_lost()
                return
            except OSError:
                continue  # a passing file-system error: the next beat tries again

    def release(self) -> None:
        """Stops the refreshing and removes the lock if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                if self._is_mine():
                    os.remove(self.path)
            self.held = False

    def _is_mine(self) -> bool:
        """The lock file is the one this process linked: same inode and same text (inodes are reused)."""
        with open(self.path) as f:
            return os.fstat(f.fileno()).st_ino == self.inode and f.read() == self.text
