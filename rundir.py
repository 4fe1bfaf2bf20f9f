"""The run directory: its name, config.json, the lock (a lease that works across hosts), the stop
signals, atomic writes, JSON lines, the log and the resumable state. No maths here; train.py, eval.py,
launch.py, report.py and analysis.py share it.

A run writes out_dir/<run name>/: config.json, metrics.jsonl (one object per periodic evaluation),
log.txt, model.pth ({'last', 'best'} state_dicts), final.json, and while it trains resume.pt and .lock.
torch is imported only by the functions that need it, so report.py and launch.py start fast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

RESUME_FILE = "resume.pt"
OUTPUT_FILES = ("final.json", "model.pth", "metrics.jsonl", "log.txt", RESUME_FILE)


# ---------------------------------------------------------------------------------------- run names
# Settings that change results, in run-name order, with their short names (named when not the default).
# batch_size_eval: the final evaluation draws each PGD restart's random start batch by batch, so the
# batching decides which start each example gets. data_on_device: on CUDA it moves the data generator
# (shuffling, crops, flips) to the GPU, whose random streams differ from the CPU's.
NAME_FIELDS = {"epochs": "ep", "lr_schedule": "", "lr_max": "lr", "batch_size": "bs", "weight_decay": "wd",
               "fgsm_alpha": "fa", "minibatch_replay": "mr", "pgd_train_n_iters": "pgdk",
               "pgd_alpha_train": "pgda", "attack_iters": "ai", "n_layers": "nl", "n_filters_cnn": "nf",
               "eval_iter_freq": "eif", "n_eval_every_k_iter": "nek", "n_final_eval": "nfe",
               "half_prec": "hp", "half_prec_dtype": "hpd", "tf32": "tf32", "debug": "debug",
               "eval_early_stopped_model": "es", "clamp_grad": "clamp-", "batch_size_eval": "bse",
               "data_on_device": "dod",
               "nfgsm_noise_mult": "nk", "zerograd_q": "zq", "elle_lambda": "elle", "elle_adaptive": "ellea",
               "grad_align_grad1": "g1", "grad_align_every": "gaev", "grad_align_fd": "gafd"}
# Config fields that are not in the run name, and why (a test checks that every field is named or here).
NOT_NAMED = {
    # the leading parts of every run name
    "dataset": "named first", "model": "named", "attack": "named", "attack_init": "named", "eps": "named",
    "grad_align_cos_lambda": "named", "seed": "named last",
    # where files are, what to do with them: no number depends on these
    "data_dir": "where the dataset is read from", "out_dir": "where the run directory goes",
    "fname": "unused, kept for the authors' scripts", "download": "fetches missing files, then reads the same",
    "overwrite": "whether a finished run is retrained",
    "final_autoattack": "adds AutoAttack to final.json; training and the PGD numbers are the same",
    # which machine. cpu and cuda draw other random numbers and round differently, as two GPU models round
    # differently, which no name could tell apart; config.json records device_used. The name must also be
    # known before the device is: launch.py --status runs on a login node, a requeued job lands on any node.
    "device": "the hardware, recorded as device_used in config.json", "gpu": "which card of a machine",
    "channels_last": "the memory layout: speed and rounding only, recorded as layouts in config.json",
}


def run_name(cfg, defaults: dict) -> str:
    """dataset_model_attack_init_eps_lambda[_non-default settings]_seed: no spaces, no timestamps.
    cfg: any object with train.py's settings as attributes; defaults: the parser's default of each."""
    parts = [cfg.dataset, cfg.model, cfg.attack, cfg.attack_init, f"eps{cfg.eps:g}",
             f"lam{cfg.grad_align_cos_lambda:g}"]
    for field, short in NAME_FIELDS.items():
        value = getattr(cfg, field)
        if value != defaults[field]:
            parts.append(short if value is True else f"{short}{value:g}" if isinstance(value, (int, float))
                         else f"{short}{value}")
    parts.append(f"seed{cfg.seed}")
    return "_".join(parts)


# ----------------------------------------------------------------------------------- atomic writes
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
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# -------------------------------------------------------------------------------------- JSON lines
# One rule for every reader: a line counts once it ends with a newline. Each record is appended in
# one write call ending in "\n", so only a crash mid-write leaves a line without one (the last).
def read_jsonl(path: str) -> list[dict]:
    """The whole lines of a JSON-lines file (a torn last line is ignored); [] if there is no file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


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


# ------------------------------------------------------------------------------- config.json, log
def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_config(run_dir: str, settings: dict) -> None:
    """config.json: the run's settings plus the torch version, the git commit and the command line."""
    import torch
    atomic_write_json(os.path.join(run_dir, "config.json"), {
        **settings, "torch_version": torch.__version__, "git_commit": git_commit(), "argv": sys.argv[1:]})


def read_config(run_dir: str) -> dict | None:
    """The config.json of a run directory, or None if it has none (e.g. the authors' checkpoints)."""
    return read_json(os.path.join(run_dir, "config.json"))


def clear_outputs(run_dir: str) -> None:
    """--overwrite: removes the previous run's files (only once this process holds the lock)."""
    for name in OUTPUT_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)


class RunLog:
    """The log: printed (above the progress bar) and appended to log.txt (not with --debug)."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, message: str) -> None:
        tqdm.write(message)
        if self.path:
            with open(self.path, "a") as f:
                f.write(message + "\n")


# ---------------------------------------------------------------------------------------- the lock
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


# ---------------------------------------------------------------------------------- stop signals
# SIGTERM: Slurm's preemption and scancel; SIGUSR2: submitit's warning before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Stopped(BaseException):
    """A stop signal arrived; raised in the main thread so the run's lock is released on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Turns STOP_SIGNALS into Stopped inside the block (main thread only; handlers restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------- resume state
def rng_state(data_generator: torch.Generator) -> dict:
    import numpy as np
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": data_generator.get_state()}


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    import numpy as np
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])


def save_resume_state(run_dir: str, state: dict, data_generator: torch.Generator) -> None:
    """resume.pt: the loop's state plus every RNG and how many lines metrics.jsonl has so far."""
    metrics_lines = len(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    atomic_torch_save({**state, "metrics_lines": metrics_lines, "rng": rng_state(data_generator)},
                      os.path.join(run_dir, RESUME_FILE))


def load_resume_state(run_dir: str, data_generator: torch.Generator) -> dict | None:
    """The state saved at the last completed epoch (None if there is none). Restores the RNGs and
    rewinds metrics.jsonl to the lines it had then."""
    import torch
    path = os.path.join(run_dir, RESUME_FILE)
    if not os.path.exists(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(saved.pop("rng"), data_generator)
    truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), saved.pop("metrics_lines"))
    return saved


def remove_resume_state(run_dir: str) -> None:
    os.remove(os.path.join(run_dir, RESUME_FILE))
