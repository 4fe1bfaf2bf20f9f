"""The run directory: its name, config.json, the lock, atomic writes, JSON lines, the log and the
resumable state. No maths here; train.py, eval.py, launch.py, report.py and analysis.py share it.

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
import socket
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

RESUME_FILE = "resume.pt"
OUTPUT_FILES = ("final.json", "model.pth", "metrics.jsonl", "log.txt", RESUME_FILE)


# ---------------------------------------------------------------------------------------- run names
# Settings that change results, in run-name order, with their short names. Not named: where files
# go, the device, and batch_size_eval (evaluation runs in eval mode: batching changes no number).
NAME_FIELDS = {"epochs": "ep", "lr_schedule": "", "lr_max": "lr", "batch_size": "bs", "weight_decay": "wd",
               "fgsm_alpha": "fa", "minibatch_replay": "mr", "pgd_train_n_iters": "pgdk",
               "pgd_alpha_train": "pgda", "attack_iters": "ai", "n_layers": "nl", "n_filters_cnn": "nf",
               "eval_iter_freq": "eif", "n_eval_every_k_iter": "nek", "n_final_eval": "nfe",
               "half_prec": "hp", "half_prec_dtype": "hpd", "tf32": "tf32", "debug": "debug",
               "eval_early_stopped_model": "es", "clamp_grad": "clamp-",
               "nfgsm_noise_mult": "nk", "zerograd_q": "zq", "elle_lambda": "elle", "elle_adaptive": "ellea",
               "grad_align_grad1": "g1", "grad_align_every": "gaev", "grad_align_fd": "gafd"}


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
    """Writes data to a temporary file beside path, then renames it over path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
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
class RunLocked(Exception):
    """Another live process holds the run's lock."""


class RunLock:
    """An exclusive lock file (run_dir/.lock holding 'host pid'); a dead process's lock is taken over."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.held = False

    def acquire(self) -> None:
        """Takes the lock or raises RunLocked. The lock file is written in full beside it and then
        hard-linked into place, so a lock that exists always names its owner."""
        me = f"{socket.gethostname()} {os.getpid()}"
        mine = f"{self.path}.{os.getpid()}"
        with open(mine, "w") as f:
            f.write(me)
        try:
            for _ in range(2):
                try:
                    os.link(mine, self.path)  # atomic: fails if the lock exists
                except FileExistsError:
                    owner = self._owner()
                    if owner is not None and self._alive(*owner):
                        raise RunLocked(f"pid {owner[1]} on {owner[0]}") from None
                    self._remove_if_owned_by(owner)  # stale: its process is gone
                    continue
                self.held = True
                return
            raise RunLocked("another process took the lock at the same moment")
        finally:
            os.remove(mine)

    def _remove_if_owned_by(self, owner: tuple[str, int] | None) -> None:
        if self._owner() == owner:  # not replaced by a live process meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _owner(self) -> tuple[str, int] | None:
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    @staticmethod
    def _alive(host: str, pid: int) -> bool:
        if host != socket.gethostname():
            return True  # cannot check another machine's processes: assume it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


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
