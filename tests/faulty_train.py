"""train.py with one fault injected, for the tests that check how a run survives it.

    python tests/faulty_train.py --kill_at 7 train.py <train.py flags>   # SIGKILL at global iteration 7
    python tests/faulty_train.py --nan_at 6 train.py <train.py flags>    # a NaN loss at global iteration 6
    python tests/faulty_train.py --hang_after_final train.py <flags>     # waits after final.json is written

The word train.py before the flags keeps the command a train.py command for launch.py (which names
the run from the flags after it). The fault is counted in training steps taken by this process, which
equals the global iteration for a run that starts fresh. Nothing here changes train.py's files:
train.train_step is wrapped in this process only (or, through injected(), in one test).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402 (imported after ROOT is on the path, so that train.py is found)


def faulty(original, kill_at: int = -1, nan_at: int = -1):
    """original (train.train_step) wrapped: SIGKILL before step kill_at, a NaN loss returned by step nan_at."""
    calls = iter(range(10**9))

    def step(*args, **kwargs):
        iteration = next(calls)
        if iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = original(*args, **kwargs)
        return loss * float("nan") if iteration == nan_at else loss
    return step


def injected(monkeypatch, nan_at: int) -> None:
    """The NaN fault inside a test process (pytest's monkeypatch undoes it after the test)."""
    monkeypatch.setattr(train, "train_step", faulty(train.train_step, nan_at=nan_at))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="faulty_train.py")
    parser.add_argument("--kill_at", type=int, default=-1)
    parser.add_argument("--nan_at", type=int, default=-1)
    parser.add_argument("--hang_after_final", action="store_true",
                        help="sleep a minute right after final.json is written (a stop then finds the run finished)")
    parser.add_argument("script", choices=["train.py"])
    args, train_argv = parser.parse_known_args(argv)
    train.train_step = faulty(train.train_step, args.kill_at, args.nan_at)
    if args.hang_after_final:
        remove = train.rundir.remove_resume_state  # train.py calls it right after writing final.json

        def hang_then_remove(run_dir):
            time.sleep(60)
            remove(run_dir)
        train.rundir.remove_resume_state = hang_then_remove
    return train.main(train_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
