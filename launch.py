"""Runs a list of train.py commands, on this machine or through Slurm, and names the ones that failed.

    DRY_RUN=1 sh/exps_diff_eps_cifar10.sh > cmds.txt
    python launch.py cmds.txt --jobs 4                  # 4 at once, spread over the visible GPUs
    sh/exps_diff_eps_cifar10.sh | python launch.py --jobs 4   # what the sweep scripts do
    python launch.py cmds.txt --slurm --partition gpu --time_min 600 --gpus_per_job 1

One command per line (`python train.py --flag=value ...`, shell quoting; blank lines and lines starting
with # are skipped). A leading `python`/`python3` becomes this interpreter. Commands run in the folder
launch.py was started in, so relative paths in the flags (--out_dir, --data_dir, @files) mean what
they mean in that shell; the script is found there, else in the repository (`python train.py` works
from any folder), and a script found in neither is named before anything runs. Locally, a command without
--device/--gpu gets `--device cuda:K` (command i on GPU i mod the number of GPUs) or `--device cpu`.
Each run's stdout and stderr go to LOG_DIR/<run name>.<8 hex digits>.log (the digits tell apart run
directories of the same name in two --out_dir; LOG_DIR defaults to runs/logs in the starting folder),
each attempt opened by a `$ cd <folder> && <command>` line with absolute paths and closed by a
`[launch.py] exit N` line (N: train.py's exit code; -K: killed by signal K; 0 with a note for a run
killed after its final.json was written: it finished). Bad input (a missing
commands file, unbalanced quotes, a --log_dir that is a file, a run name too long for a file name) ends
with one line and exit status 2 before anything runs. SIGTERM (or SIGUSR2) stops the running commands
(they keep resume.pt and resume when relaunched), starts no more and ends with one line. Finished runs cost
nothing: train.py exits at once when its final.json exists. Exit status: 0 if every command exited 0,
else 1; the failed runs are listed by name with train.py's exit code (2 bad input, 3 in progress
elsewhere, 4 NaN/inf loss).

Under Slurm each job is requeued when it is preempted or nears its time limit (at most --max_requeues
times) and resumes from its run's resume.pt; --no_wait submits and exits. Watching a sweep:

    python launch.py --status cmds.txt     # finished / in progress / interrupted / failed / not started
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import submitit

import lease
import rundir

REPO = os.path.dirname(os.path.abspath(__file__))
EXIT_MARK = "[launch.py] exit "  # the log line after each attempt: EXIT_MARK + the exit code
STOP_WAIT_S = 60   # how long a stopped command may take to free its lock before it is killed
POLL_S = 0.2       # how often a running command is checked
NAME_MAX = rundir.NAME_MAX
EXIT_USAGE = 2     # bad input, as train.py's


@dataclass(frozen=True)
class Task:
    """One command: its argv (interpreter resolved), the run it produces and where its output goes."""
    index: int
    argv: list[str]
    name: str        # the run name (out_dir/<name>; the run directory if another command's run has the same
                     # name), or cmd<index> when the flags do not parse
    run_dir: str | None  # absolute (a relative --out_dir resolves from cwd, where the command runs)
    log_path: str
    cwd: str = REPO  # the folder the command runs in (launch.py's starting folder)


@dataclass(frozen=True)
class Outcome:
    task: Task
    returncode: int | None  # None: the job never reported one (Slurm failure, timeout)
    minutes: float
    error: str = ""


class BadInput(Exception):
    """A problem with the commands or the flags, as one line naming the fix (exit status 2)."""


def read_commands(lines: list[str]) -> list[list[str]]:
    """Splits each non-blank, non-comment line with shell quoting rules; raises BadInput naming the
    line whose quoting does not close."""
    commands = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                commands.append(shlex.split(line))
            except ValueError as exc:
                raise BadInput(f"line {number} of the commands: {str(exc).lower()} ({line.strip()[:60]}); "
                               "fix its quoting") from None
    return commands


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
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            namespace = config.parse_flags(args)  # its --methods_file first, as train.py reads it
    except SystemExit:
        return None
    cfg, defaults = config.config_and_defaults(namespace)
    return os.path.join(cfg.out_dir, rundir.run_name(cfg, defaults))


def has_device_flag(args: list[str]) -> bool:
    return any(a.split("=")[0] in ("--device", "--gpu") for a in args)


def log_file(log_dir: str, run_dir: str | None, argv: list[str], index: int) -> str:
    """LOG_DIR/<run name>.<8 hex digits of the run directory's real path>.log: one log per run
    directory, whichever --out_dir spelling names it; a command that names no run: cmd<index>.<digits
    of the command>.log. The run name part is cut so the file name fits NAME_MAX."""
    if run_dir is None:
        name, key = f"cmd{index:04d}", shlex.join(argv)
    else:
        name, key = os.path.basename(run_dir), os.path.realpath(run_dir)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return os.path.join(log_dir, f"{name[:NAME_MAX - len(digest) - 5]}.{digest}.log")


def resolve_script(argv: list[str], index: int, cwd: str) -> list[str]:
    """argv with the script an interpreter runs (`python SCRIPT ...`) as an absolute path: SCRIPT from
    cwd, else from the repository (the sweeps' `python train.py`). Raises BadInput if it is in neither."""
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python") or argv[1].startswith("-"):
        return argv
    script = argv[1]
    found = next((p for p in (os.path.join(cwd, script), os.path.join(REPO, script)) if os.path.isfile(p)), None)
    if found is None:
        where = ("does not exist" if os.path.isabs(script) else
                 f"is not in {cwd}" if cwd == REPO else f"is neither in {cwd} nor in {REPO}")
        raise BadInput(f"command {index + 1} runs {script}, which {where}; fix the script's path")
    return [argv[0], os.path.normpath(found), *argv[2:]]


def make_tasks(commands: list[list[str]], log_dir: str, n_gpus: int | None, cwd: str | None = None) -> list[Task]:
    """Tasks with the interpreter and the script resolved (resolve_script), run in cwd (default: this
    process's working folder) and, if n_gpus is not None, a --device appended (cuda:K round-robin
    over n_gpus GPUs, cpu when n_gpus is 0) where the command has none."""
    cwd = os.path.abspath(cwd or os.getcwd())
    tasks = []
    for i, command in enumerate(commands):
        argv = list(command)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        argv = resolve_script(argv, i, cwd)
        args = train_args(argv)
        run_dir = run_dir_of(args) if args is not None else None
        if run_dir is not None:
            run_dir = os.path.normpath(os.path.join(cwd, run_dir))  # where train.py, run in cwd, writes
        log_path = log_file(log_dir, run_dir, argv, i)
        if args is not None and n_gpus is not None and not has_device_flag(args):
            argv.append(f"--device=cuda:{i % n_gpus}" if n_gpus else "--device=cpu")
        name = os.path.basename(run_dir) if run_dir else f"cmd{i:04d}"
        tasks.append(Task(i, argv, name, run_dir, log_path, cwd))
    shared = {name for name, n in Counter(t.name for t in tasks).items() if n > 1}
    # the same run name in two --out_dir: the reports name each by its folder
    return [dataclasses.replace(t, name=t.run_dir) if t.name in shared and t.run_dir else t for t in tasks]


def check_tasks(tasks: list[Task]) -> None:
    """Raises BadInput for a run name no file system can hold (train.py could not create its folder)."""
    for task in tasks:
        problem = rundir.name_problem(os.path.basename(task.run_dir)) if task.run_dir else None
        if problem:
            raise BadInput(f"command {task.index + 1}: {problem}")


def check_log_dir(log_dir: str, create: bool) -> None:
    """Raises BadInput if --log_dir is not a folder (or, with create, cannot be made one)."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise BadInput(f"--log_dir {log_dir} is a file, not a folder; give a folder")
    if create:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot create --log_dir {log_dir} ({exc.strerror}); give a writable folder") from None


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """SIGCONT then SIGTERM to each (as Slurm stops a job; a suspended command acts on it once continued),
    then waits up to STOP_WAIT_S for them to free their locks and end; kills those that do not."""
    for process in processes:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
    deadline = time.time() + STOP_WAIT_S
    for process in processes:
        while process.poll() is None and time.time() < deadline:
            time.sleep(POLL_S)
        if process.poll() is None:
            process.kill()


class Children:
    """The commands running now, so that a stop reaches them all: after stop() none starts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False
        self.n_started = 0

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen | None:
        """subprocess.Popen, or None once stop() was called."""
        with self._lock:
            if self.stopping:
                return None
            process = subprocess.Popen(argv, **kwargs)
            self._running.add(process)
            self.n_started += 1
            return process

    def stop(self) -> int:
        """Stops the running commands (stop_processes) and starts no more; returns how many ran."""
        with self._lock:
            self.stopping = True
            running = [p for p in self._running if p.poll() is None]
        stop_processes(running)
        return len(running)


def run_command(argv: list[str], log_path: str, cwd: str = REPO,
                started: Callable[[subprocess.Popen], None] | None = None,
                children: Children | None = None, finished: Callable[[], bool] | None = None) -> int | None:
    """Runs argv in cwd with stdout and stderr appended to log_path, then appends the exit line;
    returns the exit code. started(process) is called once the command runs. With children, the
    command starts through it (None: not started, launch.py is stopping). A command killed by a
    signal after its run finished (finished() is True: its final.json is whole) counts as exit 0."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        if children is not None and children.stopping:
            return None
        log.write(f"$ cd {shlex.quote(os.path.abspath(cwd))} && {shlex.join(argv)}\n")
        log.flush()
        popen = children.popen if children is not None else subprocess.Popen
        process = popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if process is None:
            log.write(f"{EXIT_MARK}none (not started: launch.py was stopping)\n")
            return None
        if started is not None:
            started(process)
        try:  # polled, not a blocking wait: a signal handler (submitit's checkpoint) can then wait for it too
            while process.poll() is None:
                time.sleep(POLL_S)
        finally:  # also when submitit requeues the job from its signal handler
            rc = process.poll()
            if rc is not None and rc < 0 and finished is not None and finished():
                log.write(f"{EXIT_MARK}0 (killed by {describe(rc).removeprefix('killed by signal ')} after its run "
                          "finished: final.json is whole)\n")
                rc = 0
            elif rc is not None:
                log.write(f"{EXIT_MARK}{rc}\n")
        return rc


def last_exit_code(log_path: str) -> int | None:
    """The exit code of the last attempt in a run's log; None if there is no log or the last attempt
    has no exit line (still running, or its launcher was killed)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    code = None
    for line in lines:
        if line.startswith("$ "):
            code = None
        elif line.startswith(EXIT_MARK):
            with contextlib.suppress(ValueError, IndexError):
                code = int(line[len(EXIT_MARK):].split()[0])  # the code, then maybe a note
    return code


class TrainJob(submitit.helpers.Checkpointable):
    """One Slurm job: runs one train.py command and returns its exit code.

    When the job is preempted or nears its time limit, submitit calls checkpoint() (on SIGUSR2). It
    stops the command (SIGTERM: train.py frees its run's lock; resume.pt holds its last finished
    epoch) and returns this job again as a DelayedSubmission, which submitit requeues; the new attempt,
    on whichever node, resumes from resume.pt. After max_requeues requeues it returns None: no more.
    """

    def __init__(self, argv: list[str], log_path: str, max_requeues: int, requeues: int = 0, cwd: str = REPO,
                 run_dir: str | None = None):
        self.argv, self.log_path = list(argv), log_path
        self.max_requeues, self.requeues = max_requeues, requeues
        self.cwd, self.run_dir = cwd, run_dir
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}

    def _started(self, process: subprocess.Popen) -> None:
        self._process = process

    def __call__(self) -> int:
        from config import EXIT_LOCKED
        from lease import LEASE_SECONDS
        rc = self._run()
        if self.requeues > 0 and rc == EXIT_LOCKED:
            # The previous attempt may have died without freeing the lock (a node failure): its lease
            # runs out within lease.LEASE_SECONDS; keep trying until then.
            deadline = time.time() + LEASE_SECONDS + 60
            while rc == EXIT_LOCKED and time.time() < deadline:
                time.sleep(30)
                rc = self._run()
        return rc

    def _run(self) -> int | None:
        return run_command(self.argv, self.log_path, self.cwd, started=self._started,
                           finished=lambda: run_finished(self.run_dir, self.argv))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        self.stop_command()
        if self.requeues >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.argv, self.log_path, self.max_requeues, self.requeues + 1, self.cwd, self.run_dir))

    def stop_command(self) -> None:
        """Stops the command (stop_processes) if it runs."""
        if self._process is not None and self._process.poll() is None:
            stop_processes([self._process])


def run_finished(run_dir: str | None, argv: list[str]) -> bool:
    """Whether a command's run has finished: a whole final.json of this run, with AutoAttack's accuracy
    when the command asks for it (--final_autoattack)."""
    if run_dir is None:
        return False
    final, _ = rundir.read_final(run_dir)
    if final is None or rundir.identity_problem("final.json", final, {"run_name": os.path.basename(run_dir)}):
        return False
    if "--final_autoattack" in (train_args(argv) or []):
        return all("aa_acc" in final[key] for key in ("last", "best") if key in final)
    return True


def run_task(task: Task, children: Children) -> Outcome:
    start = time.time()
    rc = run_command(task.argv, task.log_path, task.cwd, children=children,
                     finished=lambda: run_finished(task.run_dir, task.argv))
    return Outcome(task, rc, (time.time() - start) / 60)


class StoppedSweep(Exception):
    """launch.py was stopped by a signal: its running commands were stopped, no more started."""

    def __init__(self, signum: int, n_stopped: int, n_not_started: int, n_finished: int = 0):
        super().__init__(signum)
        self.signum, self.n_stopped, self.n_not_started = signum, n_stopped, n_not_started
        self.n_finished = n_finished  # running when the signal came, but their runs had finished


def run_local(tasks: list[Task], jobs: int) -> list[Outcome]:
    """Runs the tasks, `jobs` at once, reporting each as it ends. On SIGTERM or SIGUSR2 it stops the
    running commands (they keep their resume.pt), waits for them and raises StoppedSweep, which counts
    a command whose run had finished (run_finished) apart from the stopped ones."""
    outcomes, futures = [], []
    children = Children()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        with rundir.stop_on_signals():
            futures = [pool.submit(run_task, t, children) for t in tasks]
            for future in concurrent.futures.as_completed(futures):
                outcomes.append(future.result())
                print_progress(outcomes[-1], len(outcomes), len(tasks))
    except KeyboardInterrupt:  # start nothing more; the running children got the terminal's SIGINT too
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except rundir.Stopped as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        children.stop()
        pool.shutdown(wait=True)
        reported = {o.task.index for o in outcomes}
        ended = [f.result() for f in futures if f.done() and not f.cancelled()]
        late = [o for o in ended if o.task.index not in reported and o.returncode is not None]
        n_finished = sum(o.returncode == 0 for o in late)
        raise StoppedSweep(exc.signum, len(late) - n_finished, len(tasks) - children.n_started, n_finished) from None
    pool.shutdown()
    return outcomes


def run_submitit(tasks: list[Task], args: argparse.Namespace) -> list[Outcome] | None:
    """One Slurm job per task (a job array of TrainJobs) through submitit; --submitit_local runs them as
    local processes through the same submitit code path. Returns None with --no_wait (nothing awaited)."""
    from submitit.core.utils import UncompletedJobError
    executor = submitit.AutoExecutor(folder=os.path.join(args.log_dir, "submitit"),
                                     cluster="local" if args.submitit_local else "slurm",
                                     slurm_max_num_timeout=args.max_requeues)
    params = {"timeout_min": args.time_min, "gpus_per_node": args.gpus_per_job, "cpus_per_task": args.cpus_per_job,
              "mem_gb": args.mem_gb, "name": "gradalign", "slurm_array_parallelism": args.jobs}
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    start = time.time()
    with executor.batch():
        jobs = [executor.submit(TrainJob(t.argv, t.log_path, args.max_requeues, cwd=t.cwd, run_dir=t.run_dir))
                for t in tasks]
    print(f"submitted {len(jobs)} jobs ({jobs[0].job_id.split('_')[0] if jobs else '-'})", flush=True)
    if args.no_wait:
        return None
    outcomes = []
    for task, job in zip(tasks, jobs):
        try:
            outcome = Outcome(task, job.result(), (time.time() - start) / 60)
        except UncompletedJobError as exc:  # the job failed (FailedJobError), timed out or was called off
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
    p.add_argument("--log_dir", default=os.path.join("runs", "logs"),
                   help="one <run name>.log per run (relative: from the folder launch.py starts in)")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job per command through submitit")
    p.add_argument("--submitit_local", action="store_true", help="with --slurm: submitit's local executor")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time_min", type=int, default=24 * 60, help="Slurm time limit per job, minutes")
    p.add_argument("--gpus_per_job", type=int, default=1)
    p.add_argument("--cpus_per_job", type=int, default=8)
    p.add_argument("--mem_gb", type=int, default=32, help="memory per job, GB")
    p.add_argument("--max_requeues", type=int, default=3,
                   help="with --slurm: times a preempted or timed-out job is requeued (it resumes from resume.pt)")
    p.add_argument("--no_wait", action="store_true", help="with --slurm: submit, print the job array id and exit")
    p.add_argument("--status", action="store_true",
                   help="run nothing: classify each command's run (finished, in progress, interrupted, failed, "
                        "not started) from its run directory and its log in --log_dir")
    return p


STATES = ("finished", "in progress", "interrupted", "failed", "damaged", "not started")


def run_state(task: Task) -> tuple[str, str]:
    """(one of STATES, a detail) for a command, from its run directory and its log; reads only.

    finished: a whole final.json of this run. in progress: a live lock (refreshed within the lease).
    damaged: a torn or foreign final.json (not train.py's, or another run's name), or a .lock that is
    a folder (the detail says the fix). failed: the
    last attempt in the log exited with a code > 0. interrupted: started (config.json or resume.pt)
    and none of these; relaunching resumes it. not started: nothing of it on disk.
    """
    run_dir = task.run_dir
    final, damage = rundir.read_final(run_dir) if run_dir else (None, None)
    if final is not None:
        foreign = rundir.identity_problem(os.path.join(run_dir, "final.json"), final,
                                          {"run_name": os.path.basename(run_dir)})
        if not foreign:
            return "finished", ""
        final, damage = None, foreign
    owner = lease.live_lock_owner(run_dir) if run_dir else None
    if owner is not None:
        return "in progress", owner.describe()
    if damage:
        return "damaged", damage
    lock = os.path.join(run_dir, ".lock") if run_dir else ""
    if run_dir and os.path.isdir(lock):
        return "damaged", f"{lock} is a folder, not a lock file; remove it (rmdir {lock}) and relaunch"
    rc = last_exit_code(task.log_path)
    if rc is not None and rc > 0:
        return "failed", f"exit {rc} ({describe(rc)}); log {task.log_path}"
    if run_dir and os.path.exists(os.path.join(run_dir, rundir.RESUME_FILE)):
        return "interrupted", f"{rundir.RESUME_FILE} kept, no live lock"
    if run_dir and os.path.exists(os.path.join(run_dir, "config.json")):
        return "interrupted", "stopped before its first epoch ended"
    return "not started", ""


def status_report(tasks: list[Task]) -> tuple[str, bool]:
    """(the report: counts per state, then one line per run that is not finished; whether all are)."""
    states = [(task, *run_state(task)) for task in tasks]
    counts = {s: sum(state == s for _, state, _ in states) for s in STATES}
    lines = [f"{len(tasks)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    for task, state, detail in states:
        if state != "finished":
            lines.append(f"{state.upper()} {task.name}" + (f": {detail}" if detail else ""))
    return "\n".join(lines), counts["finished"] == len(tasks)


def read_lines(source: str) -> list[str]:
    """The lines of the commands file ('-': stdin); raises BadInput if it cannot be read."""
    if source == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(source, errors="replace") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise BadInput(f"cannot read the commands file {source} ({exc.strerror}); check the path") from None


def main(argv: list[str] | None = None) -> int:
    try:
        return launch(argv)
    except BadInput as exc:
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return rundir.interrupted("launch.py", "no more commands start; the running ones got Ctrl-C too and keep "
                                               "their resume.pt: relaunch the same commands to resume")
    except StoppedSweep as exc:
        finished = f", {exc.n_finished} finished (their final.json was written)" if exc.n_finished else ""
        print(f"launch.py: stopped by {signal.Signals(exc.signum).name}; stopped {exc.n_stopped} running "
              f"command(s){finished}, {exc.n_not_started} not started: relaunch the same commands to resume",
              file=sys.stderr)
        return 128 + exc.signum


def launch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        build_parser().error(f"--jobs must be >= 1 (got {args.jobs})")
    if args.max_requeues < 0:
        build_parser().error(f"--max_requeues must be >= 0 (got {args.max_requeues})")
    if args.no_wait and not args.slurm:
        build_parser().error("--no_wait needs --slurm (local runs end with launch.py)")
    args.log_dir = os.path.abspath(args.log_dir)
    commands = read_commands(read_lines(args.commands))
    if not commands:
        raise BadInput("no commands given; give a file of train.py commands, one per line")
    if args.status:
        check_log_dir(args.log_dir, create=False)
        report, all_finished = status_report(make_tasks(commands, args.log_dir, None))
        print(report, flush=True)
        return 0 if all_finished else 1
    # Locally we pick each run's device; under Slurm each job sees only its own GPUs (train.py's auto).
    tasks = make_tasks(commands, args.log_dir, None if args.slurm else visible_gpus())
    check_tasks(tasks)
    check_log_dir(args.log_dir, create=True)  # the last check, and the first write
    print(f"{len(tasks)} commands, logs in {args.log_dir}", flush=True)
    outcomes = run_submitit(tasks, args) if args.slurm else run_local(tasks, args.jobs)
    if outcomes is None:  # --no_wait
        print(f"not waiting; watch with: python launch.py --status <the same commands> --log_dir {args.log_dir}",
              flush=True)
        return 0
    print(summary(outcomes), flush=True)
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
