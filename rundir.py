"""The run directory: its name, config.json, holding it under its lock (the lease itself is lease.py),
the stop signals, atomic writes, JSON lines, the log and the resumable state. No maths here; train.py,
eval.py, launch.py, report.py and analysis.py share it.

A run writes out_dir/<run name>/: config.json, metrics.jsonl (one object per periodic evaluation),
log.txt, model.pth ({'last', 'best'} state_dicts), final.json, and while it trains resume.pt and .lock.
torch is imported only by the functions that need it, so report.py and launch.py start fast.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from tqdm import tqdm

import config
from lease import LockLost, LockUnusable, RunLock, RunLocked

if TYPE_CHECKING:
    import torch

RESUME_FILE = "resume.pt"
OUTPUT_FILES = ("final.json", "model.pth", "metrics.jsonl", "log.txt", RESUME_FILE)
EVALS_DIR = "evals"  # eval.py's re-evaluations of a run: evals/<what was evaluated>.json


# ---------------------------------------------------------------------------------------- run names
# Settings that change results, in run-name order, with their short names (named when not the default),
# and the settings left out of the name with the reason: both from config.py's declarations.
NAME_FIELDS = {name: meta["short"] for name, meta in config.FIELDS.items() if meta["short"] is not None}
NOT_NAMED = {name: meta["unnamed"] for name, meta in config.FIELDS.items() if meta["unnamed"] is not None}


def name_number(value: float) -> str:
    """A number as run names write it: the short form (%g) when it reads back as the same number, else
    every digit (repr), so two different values never share a name (0.01234561 and 0.01234564)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def run_name(cfg, defaults: dict) -> str:
    """dataset_model_attack_init_eps_lambda[_non-default settings]_seed: no spaces, no timestamps.
    cfg: any object with train.py's settings as attributes; defaults: the parser's default of each."""
    parts = [cfg.dataset, cfg.model, cfg.attack, cfg.attack_init, f"eps{name_number(cfg.eps)}",
             f"lam{name_number(cfg.grad_align_cos_lambda)}"]
    for field, short in NAME_FIELDS.items():
        value = getattr(cfg, field)
        if value != defaults[field]:
            parts.append(short if value is True else f"{short}{name_number(value)}" if isinstance(value, (int, float))
                         else f"{short}{value}")
    parts.append(f"seed{cfg.seed}")
    return "_".join(parts)


NAME_MAX = 255  # the longest file name (bytes) most file systems take


def name_problem(name: str) -> str | None:
    """Why no file system could hold a run directory of this name (over NAME_MAX bytes), with the fix."""
    size = len(os.fsencode(name))
    if size <= NAME_MAX:
        return None
    return (f"its run name has {size} bytes ({name[:40]}...), over the {NAME_MAX} a file name may have; leave some "
            "of its settings at their defaults")


def settings_hash(cfg) -> str:
    """sha256 of the settings a run name encodes (the fixed parts, and the named settings that differ
    from their --attack's default), numbers exact: stored in resume.pt and final.json, so state is
    never used by another run's settings. cfg: any object with train.py's settings as attributes."""
    defaults = config.defaults(str(cfg.attack))
    named = [n for n in NAMED if n not in NAME_FIELDS or getattr(cfg, n) != defaults[n]]
    text = "\n".join(f"{n}={exact(getattr(cfg, n))}" for n in named)
    return hashlib.sha256(text.encode()).hexdigest()


# Every setting the run name encodes: the fixed parts, then those named when not their default.
NAMED = [n for n, meta in config.FIELDS.items() if meta["unnamed"] == config.LEAD] + list(NAME_FIELDS)


def exact(value) -> str:
    """A setting's value with every digit (numbers as floats, so 8 and 8.0 agree)."""
    return repr(float(value)) if is_number(value) else repr(value)


def identity(cfg, name: str) -> dict:
    """What resume.pt and final.json carry to tie them to their run: its name and settings_hash."""
    return {"run_name": name, "settings_hash": settings_hash(cfg)}


def identity_problem(path: str, saved: dict, expected: dict) -> str | None:
    """How a resume.pt or final.json (saved) belongs to another run than `expected` (identity()'s), as
    one line with the fix; None when it is this run's or predates these keys."""
    name = saved.get("run_name")
    if name is not None and name != expected["run_name"]:
        return f"{path} belongs to run {name}; remove it or relaunch with --overwrite"
    digest = saved.get("settings_hash")
    if digest is not None and expected.get("settings_hash") is not None and digest != expected["settings_hash"]:
        return (f"{path} belongs to other settings of run {name} (settings_hash differs); remove it or "
                "relaunch with --overwrite")
    layouts = saved.get("layouts")
    if layouts is not None and expected.get("layouts") is not None and layouts != expected["layouts"]:
        def said(value: dict) -> str:
            return ", ".join(f"{p} {v}" for p, v in value.items())
        return (f"{path} was trained with the layouts {said(layouts)}, but --channels_last gives "
                f"{said(expected['layouts'])} here (auto chooses per device type): resume it on the kind of "
                "device that started it (config.json's device_used), or relaunch with --overwrite to start over")
    return None


# ------------------------------------------------------------------------------------------ errors
class RunDirError(Exception):
    """The run directory cannot be used as it is (not writable, a damaged or foreign resume.pt, a .lock
    that is a folder): one line naming the path and the fix; train.py exits with code 2, nothing written."""


# Every write of this module to a run directory first confirms that this process still holds the
# directory's lock when it took one (exclusive_run registers it here): two processes never write one
# run. A write outside exclusive_run (tests, tools that hold no lock) is not checked.
_HELD: dict[str, RunLock] = {}


def _confirm_owner(path: str) -> None:
    lock = _HELD.get(os.path.dirname(os.path.abspath(path)))
    if lock is not None:
        lock.confirm()


def owner_and_mode(path: str) -> str:
    """'owner NAME, mode 755' of path (what a permission error should show), or '' if it cannot be read."""
    import pwd
    try:
        st = os.stat(path)
    except OSError:
        return ""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"owner {owner}, mode {st.st_mode & 0o777:o}"


def access_fix(path: str, verb: str = "write") -> str:
    """The line for a file or folder of a run this user cannot read or write."""
    return (f"cannot {verb} {path} ({owner_and_mode(path) or 'permission denied'}); run as its owner or chmod "
            f"g+{verb[0]}, or pick another --out_dir")


def make_run_dir(run_dir: str) -> None:
    """Creates the run directory if needed; RunDirError (one line with the fix) if it cannot be created
    or this process cannot write it."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create {run_dir} ({exc.strerror}); pick another --out_dir") from exc
    problem = access_problem(run_dir)
    if problem:
        raise RunDirError(problem)


def access_problem(run_dir: str) -> str | None:
    """Whether this user can resume or write run_dir (the folder, the files a run appends to or
    replaces, and resume.pt readable), before any write; a one-line fix or None."""
    checks = [(run_dir, os.W_OK | os.X_OK, "write")]
    for name in ("config.json", *OUTPUT_FILES):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path):
            checks.append((path, os.W_OK, "write"))
    resume = os.path.join(run_dir, RESUME_FILE)
    if os.path.lexists(resume):
        checks.append((resume, os.R_OK, "read"))
    for path, mode, verb in checks:
        if not os.access(path, mode):
            return access_fix(path, verb)
    return None


def io_problem(exc: OSError, where: str) -> str:
    """One line for an I/O error while a run writes (full disk, file-size limit, permissions): the
    path and the fix; where: the run directory (when the error names no file)."""
    path = exc.filename or where
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return access_fix(path) + "; then relaunch to resume"
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {path} ({why}); free space or raise the limit, then relaunch to resume"
    return f"cannot write {path} ({why}); fix the file system, then relaunch to resume"


# ----------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes data to a temporary file beside path, then renames it over path.

    The temporary file is created with mode 0o666 and the process umask applied by the kernel, so the
    result has the mode a plain open(path, "w") would give (group-readable under umask 022)."""
    _confirm_owner(path)
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


# How to repair a run whose final.json or config.json is damaged (train.py, launch.py --status, report.py).
DAMAGED_FIX = "relaunch its command with --overwrite to retrain the run"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def final_problem(final) -> str | None:
    """What makes a parsed final.json unusable (not what train.py writes), or None if it is whole:
    train.py writes an object with 'eps' and the 'last' weights' clean and PGD accuracy ('best' too
    with --eval_early_stopped_model)."""
    if not isinstance(final, dict):
        return f"it holds a JSON {type(final).__name__}, not an object"
    if not is_number(final.get("eps")):
        return "it has no eps"
    for key in ("last", *(["best"] if "best" in final else [])):
        entry = final.get(key)
        if not isinstance(entry, dict) or not all(is_number(entry.get(m)) for m in ("clean_acc", "pgd_acc")):
            return f"it has no clean and PGD accuracy of the '{key}' weights"
    return None


def finished_run(run_dir: str, expected: dict) -> tuple[dict | None, str | None]:
    """(final.json, None) when the run is finished and final.json is this run's (identity() expected);
    (None, the problem with the fix) when final.json is damaged or another run's; (None, None) when
    the run has not finished."""
    final, damage = read_final(run_dir)
    if final is None:
        return None, damage
    foreign = identity_problem(os.path.join(run_dir, "final.json"), final, expected)
    return (None, foreign) if foreign else (final, None)


def read_final(run_dir: str) -> tuple[dict | None, str | None]:
    """A run's final.json: (its content, None) when the run finished; (None, None) when there is no
    final.json; (None, one line naming the damage and the fix) when it is torn or not train.py's."""
    path = os.path.join(run_dir, "final.json")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        return None, f"{path} is a folder, not train.py's file; remove it and {DAMAGED_FIX}"
    except OSError as exc:
        return None, f"cannot read {path} ({exc.strerror or exc}); check its permissions"
    try:
        final = json.loads(text)
    except ValueError:
        return None, f"{path} is damaged (not whole JSON: truncated?); {DAMAGED_FIX}"
    problem = final_problem(final)
    if problem:
        return None, f"{path} is damaged ({problem}); {DAMAGED_FIX}"
    return final, None


# -------------------------------------------------------------------------------------- JSON lines
# One rule for every reader: a line counts once it ends with a newline. Each record is appended in
# one write call ending in "\n", so only a crash mid-write leaves a line without one (the last).
def read_jsonl(path: str) -> list[dict]:
    """The whole lines of a JSON-lines file (a torn last line is ignored); [] if there is no file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def read_jsonl_records(path: str) -> tuple[list[dict], list[int]]:
    """(the JSON objects of the whole lines, the 1-based numbers of whole lines that are not one).
    For readers that should go on past a damaged line (report.py --curves, analysis.py) and say how
    many they skipped; [] and [] if there is no file."""
    records, damaged = [], []
    if not os.path.exists(path):
        return records, damaged
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                continue  # a torn last line
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                damaged.append(number)
    return records, damaged


def append_jsonl(path: str, obj: dict) -> None:
    """Appends one whole line in a single write call."""
    _confirm_owner(path)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def truncate_jsonl(path: str, n_lines: int) -> None:
    """Keeps the first n_lines whole lines (drops lines written after a checkpoint and torn ones)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = [line for line in f if line.endswith(b"\n")][:n_lines]
    atomic_write_bytes(path, b"".join(lines))


# ------------------------------------------------------------------------------------------ Ctrl-C
# eval.py, report.py and launch.py end on Ctrl-C with one line and the shell's status for SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def interrupted(prog: str, detail: str) -> int:
    """Says in one line that prog was interrupted, and what that left; returns EXIT_INTERRUPTED."""
    print(f"{prog}: interrupted (Ctrl-C); {detail}", file=sys.stderr)
    return EXIT_INTERRUPTED


def stopped_with(exc: BaseException, prog: str, run_dir: str) -> int:
    """The one line and the exit code of a run stopped by exc: another process holds the run (3), the
    run directory cannot be used as it is (2), this process lost its lock (3), a write failed (a full
    disk, a file-size limit, a permission changed mid-run: 1), or Ctrl-C (130)."""
    if isinstance(exc, KeyboardInterrupt):
        return interrupted(prog, resume_hint(run_dir))
    if isinstance(exc, RunLocked):
        line, code = f"{run_dir} is in progress ({exc}); not starting it twice", config.EXIT_LOCKED
    elif isinstance(exc, LockLost):
        line, code = str(exc), config.EXIT_LOCKED
    elif isinstance(exc, RunDirError):
        line, code = f"error: {exc}", config.EXIT_USAGE
    else:
        line, code = f"error: {io_problem(exc, run_dir)}", config.EXIT_IO
    print(f"{prog}: {line}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------- config.json, log
def damaged_metrics_warning(run_dir: str) -> list[str]:
    """A warning naming the damaged middle lines of a resumed run's metrics.jsonl (kept as they are), if any."""
    _, damaged = read_jsonl_records(os.path.join(run_dir, "metrics.jsonl"))
    if not damaged:
        return []
    lines = ", ".join(map(str, damaged))
    return [(f"warning: {run_dir}/metrics.jsonl has {len(damaged)} damaged line(s) (line {lines}); kept as they "
            "are: report.py --curves and analysis.py skip them")]


def format_record(r: dict) -> str:
    """A metrics.jsonl record as the log line train.py prints."""
    return (f"{r['epoch']}-{r['iteration']}: [train] loss {r['train_loss']:.3f}, reg {r['train_reg']:.3f}, "
            f"acc {r['train_acc']:.2%}, acc_pgd {r['train_pgd_acc']:.2%}  [test] acc_clean "
            f"{r['test_clean_acc']:.2%}, acc_fgsm {r['test_fgsm_acc']:.2%}, acc_pgd {r['test_pgd_acc']:.2%}, "
            f"cos_x_eta {r['cos_x_eta']:.3f}, cos_fgsm_pgd {r['cos_fgsm_pgd']:.3f} "
            f"({r['train_minutes']:.2f}m, {r['elapsed_s'] / 60:.2f}m)")


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


def config_problem(run_dir: str, cfg) -> str | None:
    """How a finished run's config.json disagrees with the settings its name and final.json stand for
    (cfg: the command's, whose identity() final.json matched), as one line with the fix; None when
    they agree or there is no config.json (a run of the authors' code)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.lexists(path):
        return None
    fix = "restore config.json (its argv is the command) or relaunch with --overwrite to retrain"
    settings = read_json(path)
    if not isinstance(settings, dict):
        return f"{path} is damaged (not a JSON object); {fix}"
    try:
        recorded = config.from_record(settings)
        differ = [(n, getattr(recorded, n), getattr(cfg, n)) for n in NAMED
                  if exact(getattr(recorded, n)) != exact(getattr(cfg, n))]
    except (TypeError, ValueError) as exc:
        return f"{path} is damaged ({exc}); {fix}"
    if not differ:
        return None
    said = ", ".join(f"{n} {there!r}" if not is_number(there) else f"{n} {there:g}" for n, there, _ in differ)
    run = ", ".join(f"{n} {here!r}" if not is_number(here) else f"{n} {here:g}" for n, _, here in differ)
    return (f"{path} says {said}, but the run (its name and final.json) has {run}: config.json was edited; {fix}")


def clear_outputs(run_dir: str) -> None:
    """--overwrite: removes the previous run's files (only once this process holds the lock)."""
    _confirm_owner(os.path.join(run_dir, "config.json"))
    for name in OUTPUT_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)
    evals = os.path.join(run_dir, EVALS_DIR)  # eval.py's re-evaluations of the weights being replaced
    if os.path.isdir(evals):
        import shutil
        shutil.rmtree(evals)


class RunLog:
    """The log: printed (above the progress bar) and appended to log.txt (not with --debug)."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, message: str) -> None:
        tqdm.write(message)
        if self.path:
            _confirm_owner(self.path)
            with open(self.path, "a") as f:
                f.write(message + "\n")


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


def count_jsonl_lines(path: str) -> int:
    """How many whole lines (ending with a newline) a JSON-lines file has, parsed or not: the count
    truncate_jsonl keeps; 0 if there is no file."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def save_resume_state(run_dir: str, state: dict, data_generator: torch.Generator) -> None:
    """resume.pt: the loop's state (with identity()'s run_name and settings_hash: the run it belongs
    to) plus every RNG and how many lines metrics.jsonl has so far."""
    metrics_lines = count_jsonl_lines(os.path.join(run_dir, "metrics.jsonl"))
    atomic_torch_save({**state, "metrics_lines": metrics_lines, "rng": rng_state(data_generator)},
                      os.path.join(run_dir, RESUME_FILE))


# Keys every resume.pt has (besides the loop's own fields).
RESUME_KEYS = ("rng", "metrics_lines", "next_epoch", "iteration")


def load_resume_state(run_dir: str, data_generator: torch.Generator, run: dict | None = None) -> dict | None:
    """The state saved at the last completed epoch (None if there is none). Restores the RNGs and
    rewinds metrics.jsonl to the lines it had then. Raises RunDirError, before changing anything, if
    resume.pt is damaged or belongs to another run than `run` (identity()'s; a resume.pt written
    without these keys is taken as this run's)."""
    import pickle

    import torch
    path = os.path.join(run_dir, RESUME_FILE)
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except PermissionError:
        raise RunDirError(access_fix(path, "read")) from None
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        why = "empty" if os.path.getsize(path) == 0 else f"{type(exc).__name__}: truncated?"
        raise RunDirError(f"{path} is damaged ({why}); relaunch with --overwrite to start over") from None
    missing = [k for k in RESUME_KEYS if k not in saved] if isinstance(saved, dict) else ["a dict"]
    if missing:
        raise RunDirError(f"{path} is damaged (no {', '.join(missing)}: not train.py's resume state); relaunch "
                          "with --overwrite to start over")
    problem = identity_problem(path, saved, run) if run else None
    if problem:
        raise RunDirError(problem)
    for key in ("run_name", "settings_hash", "layouts"):
        saved.pop(key, None)
    set_rng_state(saved.pop("rng"), data_generator)
    truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), saved.pop("metrics_lines"))
    return saved


def remove_resume_state(run_dir: str) -> None:
    _confirm_owner(os.path.join(run_dir, RESUME_FILE))
    os.remove(os.path.join(run_dir, RESUME_FILE))


# ------------------------------------------------------------------------------- holding a run
@contextlib.contextmanager
def exclusive_run(run_dir: str, prog: str):
    """Holds run_dir's lock for the block (RunLocked if another live process holds it).

    A stop signal (STOP_SIGNALS) inside the block releases the lock at once (a requeued job, on any
    node, can take the run over), says what is on disk, and ends this process by that signal (its exit
    status: killed by it). While the lock is held, every write of this module to run_dir confirms it
    first; a lock deleted or taken over (this process stalled longer than the lease) raises LockLost,
    at the next write or, from the refreshing thread, through SIGTERM.
    """
    lock = RunLock(run_dir, on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    key = os.path.abspath(run_dir)
    with stop_on_signals():
        try:
            try:
                lock.acquire()
            except LockUnusable as exc:
                raise RunDirError(unusable_lock_fix(exc)) from None
            _HELD[key] = lock
            yield lock
        except Stopped as exc:
            _HELD.pop(key, None)
            if lock.lost:  # the refreshing thread found the lock gone
                raise LockLost(lock.lost_message()) from None
            lock.release()
            print(f"{prog}: stopped by {signal.Signals(exc.signum).name}; {resume_hint(run_dir)}", file=sys.stderr)
            signal.signal(exc.signum, signal.SIG_DFL)
            os.kill(os.getpid(), exc.signum)  # end as the signal would have ended us
            raise
        finally:
            _HELD.pop(key, None)
            lock.release()


def unusable_lock_fix(exc: LockUnusable) -> str:
    """The line for a lock file that cannot be made: a folder in its place, or a run directory this user
    cannot write."""
    if exc.folder:
        return f"{exc.path} is a folder, not a lock file; remove it (rmdir {exc.path}) and relaunch"
    return access_fix(os.path.dirname(exc.path))


def resume_hint(run_dir: str) -> str:
    """What an interrupted run left on disk, and how to go on (for the line that says it stopped)."""
    if os.path.exists(os.path.join(run_dir, "final.json")):
        settings = read_config(run_dir)
        if not (isinstance(settings, dict) and settings.get("final_autoattack") is True):
            return f"{run_dir}/final.json keeps the finished run's results: the run is complete"
        return (f"{run_dir}/final.json keeps the finished run's results (an AutoAttack addition in progress is "
                "lost): relaunch the same command to add it")
    if os.path.exists(os.path.join(run_dir, RESUME_FILE)):
        return f"{run_dir}/{RESUME_FILE} holds the last finished epoch: relaunch the same command to resume"
    return f"no epoch of {run_dir} had finished: relaunching the same command starts it over"


# ----------------------------------------------------------------------------------- moved names
# Re-exported for one release: the lease lock lives in lease.py now (import these from there).
from lease import HEARTBEAT_SECONDS, LEASE_SECONDS, LockOwner, live_lock_owner, read_lock  # noqa: E402, F401
