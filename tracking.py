"""train.py --log_to: a copy of metrics.jsonl's rows, and the final numbers, for TensorBoard or W&B.

metrics.jsonl stays the record; a tracker only mirrors it. Each periodic row becomes one scalar per
numeric field, named as its metrics.jsonl key, at global step = the row's iteration; the final
numbers come at the end as final/<weights>/<key> (TensorBoard: at the last iteration; W&B: the run's
summary). Both are optional extras: `pip install -r requirements-log.txt`.

A resumed run continues its curves without duplicates: it opens its tracker with the rows that
metrics.jsonl holds at the resume point (those after it were dropped with the rest of the interrupted
epoch). TensorBoard writes them again into a new event file opened with purge_step 0, which makes
TensorBoard discard what earlier event files said; W&B keeps the run's id (run_dir/wandb_run_id) and
logs the rows from the step the run resumes at (offline: all of them, into the new offline folder,
so the newest one holds the whole curve).

    tracker = tracking.open_tracker("tensorboard", run_dir, run_name, settings, rows_so_far,
                                    rundir.atomic_write_bytes)
    tracker.row(record)      # after each metrics.jsonl row
    tracker.final(final, last_iteration)
    tracker.close()
"""
from __future__ import annotations

import importlib.util
import math
import os
import secrets
from collections.abc import Callable

INSTALL = "pip install -r requirements-log.txt"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log_to's choice -> the package it needs
WANDB_ID_FILE = "wandb_run_id"
WANDB_PROJECT = "fast-adversarial"  # W&B's project unless WANDB_PROJECT says otherwise


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def missing(kind: str | None) -> str | None:
    """The one-line error for --log_to kind when its package is not installed, else None (also for None)."""
    package = PACKAGES.get(kind)
    if package is None or installed(package):
        return None
    return f"--log_to {kind} needs the {package} package, an optional extra: run `{INSTALL}`"


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl row, by key (not the iteration: it is the step; lists such
    as filter_norms, None and non-finite values are left out)."""
    return {key: float(value) for key, value in record.items()
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def final_scalars(final: dict) -> dict[str, float]:
    """final.json's accuracies of each set of weights as final/<weights>/<key>."""
    return {f"final/{weights}/{key}": value for weights in ("last", "best") if isinstance(final.get(weights), dict)
            for key, value in scalars(final[weights]).items()}


class Tracker:
    """No tracker (no --log_to): every call does nothing."""

    def row(self, record: dict) -> None:
        pass

    def final(self, final: dict, step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoard(Tracker):
    """Event files under run_dir/tensorboard (`tensorboard --logdir <run_dir>/tensorboard`)."""

    def __init__(self, run_dir: str, rows: list[dict]):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step 0: TensorBoard forgets what earlier event files of the folder said; the rows so far
        # follow, so the curves are metrics.jsonl's, once each.
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=0)
        for record in rows:
            self.row(record)

    def row(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["iteration"])
        self.writer.flush()

    def final(self, final: dict, step: int) -> None:
        for key, value in final_scalars(final).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB(Tracker):
    """A W&B run named as the run directory, with config.json's settings as its config; offline
    (files under run_dir/wandb, or WANDB_DIR; `wandb sync` uploads them) unless WANDB_MODE is set."""

    def __init__(self, run_dir: str, name: str, settings: dict, rows: list[dict],
                 write_bytes: Callable[[str, bytes], None]):
        import wandb
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        if rows and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:  # a new run (or --overwrite): a new W&B run
            run_id = secrets.token_hex(8)
            write_bytes(id_path, run_id.encode())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=name, id=run_id,
                              config=settings, resume="allow", mode=os.environ.get("WANDB_MODE", "offline"),
                              dir=None if os.environ.get("WANDB_DIR") else run_dir, reinit="create_new",
                              # no copy of the console (train.py's last stdout line stays its JSON)
                              settings=wandb.Settings(silent=True, console="off"))
        start = self.run.starting_step  # the step W&B resumes at (0 offline and for a new run)
        for record in rows:
            if record["iteration"] >= start:
                self.row(record)

    def row(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["iteration"])

    def final(self, final: dict, step: int) -> None:
        self.run.summary.update(final_scalars(final))

    def close(self, failed: bool = False) -> None:
        import wandb
        self.run.finish(exit_code=1 if failed else 0)
        wandb.teardown()  # stops W&B's service process (and unsets WANDB_SERVICE, which points at it)


def open_tracker(kind: str | None, run_dir: str, name: str, settings: dict, rows: list[dict],
                 write_bytes: Callable[[str, bytes], None]) -> Tracker:
    """The tracker of --log_to kind (None: none), given the metrics.jsonl rows written so far.
    write_bytes(path, data): how a file of the run directory is written (train.py passes
    rundir.atomic_write_bytes: atomic, and only while the run's lock is held); W&B's run id is one."""
    if kind == "tensorboard":
        return TensorBoard(run_dir, rows)
    if kind == "wandb":
        return WandB(run_dir, name, settings, rows, write_bytes)
    return Tracker()
