"""Runs a list of train.py commands, on this machine or through Slurm, and names the ones that failed.

    DRY_RUN=1 sh/exps_diff_eps_cifar10.sh > cmds.txt
    python launch.py cmds.txt --jobs 4                  # 4 at once, spread over the visible GPUs
    sh/exps_diff_eps_cifar10.sh | python launch.py --jobs 4   # what the sweep scripts do
    python launch.py cmds.txt --slurm --partition gpu --time_min 600 --gpus_per_job 1

One command per line (`python train.py --flag=value ...`, shell quoting; blank lines and lines starting
with # are skipped). A leading `python`/`python3` becomes this interpreter. Commands run from the
repository root, so `train.py` and relative paths in the flags resolve there. Locally, a command without
--device/--gpu gets `--device cuda:K` (command i on GPU i mod the number of GPUs) or `--device cpu`.
Each run's stdout and stderr go to LOG_DIR/<run name>.log. Finished runs cost nothing: train.py exits
at once when its final.json exists. Exit status: 0 if every command exited 0, else 1; the failed runs
are listed by name with train.py's exit code (2 bad input, 3 in progress elsewhere, 4 NaN/inf loss).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Task:
    """One command: its argv (interpreter resolved), the run it produces and where its output goes."""
    index: int
    argv: list[str]
    name: str        # the run name (out_dir/<name>), or cmd<index> when the flags do not parse
    run_dir: str | None
    log_path: str


@dataclass(frozen=True)
class Outcome:
    task: Task
    returncode: int | None  # None: the job never reported one (Slurm failure, timeout)
    minutes: float
    error: str = ""


def read_commands(lines: list[str]) -> list[list[str]]:
    """Splits each non-blank, non-comment line with shell quoting rules."""
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def train_args(argv: list[str]) -> list[str] | None:
    """The flags after `train.py` in a command, or None if it does not run train.py."""
    for i, word in enumerate(argv):
        if os.path.basename(word) == "train.py":
            return argv[i + 1:]
    return None


def run_dir_of(args: list[str]) -> str | None:
    """out_dir/<run name> that train.py would write for these flags; None if argparse rejects them.
    Flags that parse but fail train.py's checks (say --eps -1) still get their name."""
    import config  # imports torch: only when needed
    import rundir
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            namespace = config.build_parser().parse_args(args)
    except SystemExit:
        return None
    cfg, defaults = config.config_and_defaults(namespace)
    return os.path.join(cfg.out_dir, rundir.run_name(cfg, defaults))


def has_device_flag(args: list[str]) -> bool:
    return any(a.split("=")[0] in ("--device", "--gpu") for a in args)


def make_tasks(commands: list[list[str]], log_dir: str, n_gpus: int | None) -> list[Task]:
    """Tasks with the interpreter resolved and, if n_gpus is not None, a --device appended
    (cuda:K round-robin over n_gpus GPUs, cpu when n_gpus is 0) where the command has none."""
    tasks = []
    for i, argv in enumerate(commands):
        argv = list(argv)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        args = train_args(argv)
        run_dir = run_dir_of(args) if args is not None else None
        if args is not None and n_gpus is not None and not has_device_flag(args):
            argv.append(f"--device=cuda:{i % n_gpus}" if n_gpus else "--device=cpu")
        name = os.path.basename(run_dir) if run_dir else f"cmd{i:04d}"
        tasks.append(Task(i, argv, name, run_dir, os.path.join(log_dir, f"{name}.log")))
    return tasks


def run_command(argv: list[str], log_path: str, cwd: str = REPO) -> int:
    """Runs argv in cwd with stdout and stderr appended to log_path; returns the exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode


def run_task(task: Task) -> Outcome:
    start = time.time()
    rc = run_command(task.argv, task.log_path)
    return Outcome(task, rc, (time.time() - start) / 60)


def run_local(tasks: list[Task], jobs: int) -> list[Outcome]:
    """Runs the tasks, `jobs` at once, reporting each as it ends."""
    outcomes = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(run_task, t) for t in tasks]
        for future in concurrent.futures.as_completed(futures):
            outcomes.append(future.result())
            print_progress(outcomes[-1], len(outcomes), len(tasks))
    except KeyboardInterrupt:  # start nothing more; the running children got the terminal's SIGINT too
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return outcomes


def run_submitit(tasks: list[Task], args: argparse.Namespace) -> list[Outcome]:
    """One Slurm job per task (a job array) through submitit; --submitit_local runs them as local
    processes through the same submitit code path."""
    import submitit
    from submitit.core.utils import UncompletedJobError
    executor = submitit.AutoExecutor(folder=os.path.join(args.log_dir, "submitit"),
                                     cluster="local" if args.submitit_local else "slurm")
    params = {"timeout_min": args.time_min, "gpus_per_node": args.gpus_per_job, "cpus_per_task": args.cpus_per_job,
              "mem_gb": args.mem_gb, "name": "gradalign", "slurm_array_parallelism": args.jobs}
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    start = time.time()
    jobs = executor.map_array(run_command, [t.argv for t in tasks], [t.log_path for t in tasks])
    print(f"submitted {len(jobs)} jobs ({jobs[0].job_id.split('_')[0] if jobs else '-'})", flush=True)
    outcomes = []
    for task, job in zip(tasks, jobs):
        try:
            outcome = Outcome(task, job.result(), (time.time() - start) / 60)
        except UncompletedJobError as exc:  # the job failed (FailedJobError), timed out or was cancelled
            outcome = Outcome(task, None, (time.time() - start) / 60, f"{type(exc).__name__}: {exc}".splitlines()[0])
        outcomes.append(outcome)
        print_progress(outcome, len(outcomes), len(tasks))
    return outcomes


def describe(returncode: int | None) -> str:
    """A train.py exit code in words."""
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    from config import EXIT_MEANINGS
    return EXIT_MEANINGS.get(returncode, "error (see the log)")


def print_progress(outcome: Outcome, done: int, total: int) -> None:
    status = "ok" if outcome.returncode == 0 else f"FAILED exit {outcome.returncode}: {describe(outcome.returncode)}"
    print(f"[{done}/{total}] {outcome.task.name}: {status} ({outcome.minutes:.1f} min)", flush=True)


def summary(outcomes: list[Outcome]) -> str:
    """The closing report: counts, then one line per failed run (name, exit code, meaning, log)."""
    failed = sorted((o for o in outcomes if o.returncode != 0), key=lambda o: o.task.index)
    lines = [f"{len(outcomes)} runs: {len(outcomes) - len(failed)} ok, {len(failed)} failed"]
    for o in failed:
        reason = o.error or describe(o.returncode)
        lines.append(f"FAILED {o.task.name}: exit {o.returncode} ({reason}); log {o.task.log_path}")
    return "\n".join(lines)


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("commands", nargs="?", default="-", help="file of commands, one per line ('-': stdin)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (Slurm: the array's parallelism)")
    p.add_argument("--log_dir", default=os.path.join(REPO, "runs", "logs"), help="one <run name>.log per run")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job per command through submitit")
    p.add_argument("--submitit_local", action="store_true", help="with --slurm: submitit's local executor")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time_min", type=int, default=24 * 60, help="Slurm time limit per job, minutes")
    p.add_argument("--gpus_per_job", type=int, default=1)
    p.add_argument("--cpus_per_job", type=int, default=8)
    p.add_argument("--mem_gb", type=int, default=32, help="memory per job, GB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        build_parser().error(f"--jobs must be >= 1 (got {args.jobs})")
    args.log_dir = os.path.abspath(args.log_dir)
    if args.commands == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.commands) as f:
            lines = f.read().splitlines()
    commands = read_commands(lines)
    if not commands:
        print("launch.py: no commands given", file=sys.stderr)
        return 2
    # Locally we pick each run's device; under Slurm each job sees only its own GPUs (train.py's auto).
    tasks = make_tasks(commands, args.log_dir, None if args.slurm else visible_gpus())
    print(f"{len(tasks)} commands, logs in {args.log_dir}", flush=True)
    outcomes = run_submitit(tasks, args) if args.slurm else run_local(tasks, args.jobs)
    print(summary(outcomes), flush=True)
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
