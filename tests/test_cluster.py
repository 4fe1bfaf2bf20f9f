"""Sweeps on a shared cluster: the lease lock across hosts, file modes under the umask, Slurm requeue
through submitit, launch.py --status, run names that cover every setting, bad input before any write."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import config
import launch
import rundir
import train
from tests.fixtures import ROOT, RUN, TINY, comparable, run_dir_of, write_cifar10, write_svhn


def write_lock(run_dir: str, host: str, pid: int, age_s: float) -> str:
    """A lock file in train.py's format, last refreshed age_s seconds ago."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "since": "2026-01-01T00:00:00Z", "pid_ns": None}, f)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


# ---------------------------------------------------------------------------------------- the lease lock
# (a SIGKILLed run whose stale lock names another node: test_robustness.py's kill-and-resume test)
def test_recent_lock_naming_another_host_exits_3_and_writes_nothing(tmp_path, capsys):
    args = TINY + ["--out_dir", str(tmp_path)]
    cfg, defaults = config.parse_config(args)
    run_dir = os.path.join(str(tmp_path), rundir.run_name(cfg, defaults))
    lock = write_lock(run_dir, "node-a17", 4242, age_s=rundir.LEASE_SECONDS - 30)
    before = open(lock).read()
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "pid 4242 on node-a17" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(run_dir) == [".lock"] and open(lock).read() == before


def test_lock_names_its_holder_is_refreshed_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LEASE_SECONDS", 0.5)  # refreshed every 0.1 s
    lock = rundir.RunLock(str(tmp_path))
    lock.acquire()
    try:
        owner, _ = rundir.read_lock(lock.path)
        assert (owner.host, owner.pid, owner.since[:2]) == (os.uname().nodename, os.getpid(), "20")
        os.utime(lock.path, (0, 0))  # as if last refreshed in 1970
        time.sleep(0.4)
        assert time.time() - os.stat(lock.path).st_mtime < 0.3  # the heartbeat refreshed it
        with pytest.raises(rundir.RunLocked, match=f"pid {os.getpid()} on "):
            rundir.RunLock(str(tmp_path)).acquire()
        assert rundir.live_lock_owner(str(tmp_path)).pid == os.getpid()
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []
    assert rundir.live_lock_owner(str(tmp_path)) is None


@pytest.mark.parametrize("content", ["", "{half a lock", '{"host": "node-a17"}'])
def test_an_unreadable_lock_is_never_taken_for_a_live_one(tmp_path, content):
    with open(tmp_path / ".lock", "w") as f:
        f.write(content)  # fresh mtime, but names no holder
    lock = rundir.RunLock(str(tmp_path))
    lock.acquire()
    assert rundir.read_lock(lock.path)[0].pid == os.getpid()
    lock.release()


def test_a_lock_taken_over_meanwhile_is_put_back_and_a_lost_lock_is_reported(tmp_path, monkeypatch):
    # Two contenders saw the same stale lock; the first replaced it. The second's rename-aside then
    # catches the first's fresh lock: it must link it back, not remove it.
    holder = rundir.RunLock(str(tmp_path))
    holder.acquire()
    inode = os.stat(holder.path).st_ino
    holder._set_aside(inode + 1, holder.path + ".stale.test")  # judged stale: a lock with another inode
    assert os.stat(holder.path).st_ino == inode and os.listdir(tmp_path) == [".lock"]
    holder.release()
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(rundir, "LEASE_SECONDS", 0.25)
    lost = threading.Event()
    lock = rundir.RunLock(str(tmp_path), on_lost=lost.set)
    lock.acquire()
    os.remove(lock.path)  # another process judged it stale and took over
    write_lock(str(tmp_path), "node-a17", 4242, age_s=0)
    assert lost.wait(5) and not lock.held
    lock.release()
    assert rundir.read_lock(lock.path)[0].host == "node-a17"  # the new holder's lock is left alone


# ----------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_of_a_finished_run_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        args = [a for a in TINY if a != "--debug"] + ["--out_dir", str(tmp_path), "--epochs", "0",
                                                     "--n_final_eval", "16"]  # --debug writes no log.txt
        assert train.main(args) == 0
        logged = launch.run_command([sys.executable, "-c", "pass"], str(tmp_path / "logs" / "x.log"))
        assert logged == 0
        rundir.atomic_torch_save({"a": 1}, str(tmp_path / "resume.pt"))
    finally:
        os.umask(old)
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path) for name in names]
    assert {"config.json", "final.json", "model.pth", "metrics.jsonl", "log.txt", "x.log", "resume.pt"} <= {
        os.path.basename(p) for p in paths}
    for path in paths:
        mode = os.stat(path).st_mode & 0o777
        assert mode == 0o666 & ~umask, (path, oct(mode))


# ------------------------------------------------------------------------------------ Slurm requeue
@pytest.mark.slow
def test_checkpoint_stops_the_command_and_returns_the_job_again_until_max_requeues(tmp_path):
    job = launch.TrainJob([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "r.log"),
                          max_requeues=2, requeues=1)
    result = {}
    runner = threading.Thread(target=lambda: result.update(rc=job()))
    runner.start()
    deadline = time.time() + 30
    while job._process is None and time.time() < deadline:
        time.sleep(0.05)
    delayed = job.checkpoint()
    runner.join(30)
    assert result["rc"] == -signal.SIGTERM
    again = delayed.function
    assert isinstance(again, launch.TrainJob) and (again.argv, again.log_path) == (job.argv, job.log_path)
    assert (again.requeues, again.max_requeues, again._process) == (2, 2, None)
    assert again.checkpoint() is None  # requeued twice already: no more
    assert launch.last_exit_code(job.log_path) == -signal.SIGTERM


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_job_stopped_by_submitit_is_requeued_and_finishes_from_resume_pt(tmp_path, tiny_run):
    whole = tiny_run(*RUN[len(TINY):]).run_dir  # the uninterrupted run, in-process
    out, logs = tmp_path / "runs", tmp_path / "logs"
    (tmp_path / "cmds.txt").write_text(f"python train.py {shlex.join(RUN)} --out_dir {shlex.quote(str(out))}\n")
    run_dir = run_dir_of(out, RUN)
    sweep = subprocess.Popen([sys.executable, "launch.py", str(tmp_path / "cmds.txt"), "--log_dir", str(logs),
                              "--slurm", "--submitit_local", "--gpus_per_job", "0", "--cpus_per_job", "1",
                              "--mem_gb", "1", "--time_min", "10"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(run_dir, rundir.RESUME_FILE)) and time.time() < deadline:
            time.sleep(0.01)
        child = rundir.read_lock(os.path.join(run_dir, ".lock"))[0].pid
        os.kill(child, signal.SIGSTOP)  # frozen mid-run, so the stop lands before it ends
        os.kill(_parent_pid(child), signal.SIGUSR2)  # what Slurm sends submitit's job before its time limit
        output, _ = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    assert "1 runs: 1 ok, 0 failed" in output
    log = open(launch.log_file(str(logs), run_dir, [], 0)).read()
    assert log.count("$ ") == 2 and f"{launch.EXIT_MARK}-{int(signal.SIGTERM)}" in log
    assert "resuming" in log and log.rstrip().endswith(f"{launch.EXIT_MARK}0")
    assert comparable(run_dir) == comparable(whole)


# --------------------------------------------------------------------------------------------- status
def test_status_classifies_finished_in_progress_interrupted_failed_and_absent_runs(tmp_path, capsys):
    commands = [f"python train.py {shlex.join(TINY)} --out_dir {tmp_path / 'runs'} --seed {s}" for s in range(5)]
    (tmp_path / "cmds.txt").write_text("\n".join(commands) + "\n")
    tasks = launch.make_tasks(launch.read_commands(commands), str(tmp_path / "logs"), None)
    finished, running, interrupted, failed, absent = tasks
    for task in tasks[:4]:
        os.makedirs(task.run_dir)
        rundir.atomic_write_json(os.path.join(task.run_dir, "config.json"), {})
    rundir.atomic_write_json(os.path.join(finished.run_dir, "final.json"),
                             {"eps": 76, "last": {"clean_acc": 0.5, "pgd_acc": 0.1}})
    write_lock(running.run_dir, "node-a17", 4242, age_s=10)
    for task in (interrupted, failed):
        open(os.path.join(task.run_dir, rundir.RESUME_FILE), "wb").close()
    launch.run_command([sys.executable, "-c", "import sys; sys.exit(4)"], failed.log_path)
    launch.run_command([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                       interrupted.log_path)
    assert launch.main(["--status", str(tmp_path / "cmds.txt"), "--log_dir", str(tmp_path / "logs")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "5 runs: 1 finished, 1 in progress, 1 interrupted, 1 failed, 0 damaged, 1 not started"
    assert lines[1].startswith(f"IN PROGRESS {running.name}: pid 4242 on node-a17")
    assert lines[2] == f"INTERRUPTED {interrupted.name}: resume.pt kept, no live lock"
    assert lines[3].startswith(f"FAILED {failed.name}: exit 4 (the training loss became NaN or inf)")
    assert lines[4] == f"NOT STARTED {absent.name}"
    assert len(lines) == 5 and finished.name not in "\n".join(lines)


# ------------------------------------------------------------------------------------------ run names
def _another_value(action: argparse.Action, current):
    """A valid value of a flag other than `current`."""
    if action.choices:
        return next(c for c in action.choices if c != current)
    if isinstance(current, bool) or current is None:
        return not current
    return current + 1 if isinstance(current, int) else current * 2 + 1


def test_every_config_field_is_in_the_run_name_or_listed_as_changing_nothing():
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert not set(rundir.NAME_FIELDS) & set(rundir.NOT_NAMED)
    assert fields == set(rundir.NAME_FIELDS) | set(rundir.NOT_NAMED), "name the new field, or list it in NOT_NAMED"
    parser = config.build_parser()
    base_cfg, defaults = config.parse_config(TINY)
    base = rundir.run_name(base_cfg, defaults)
    actions = {a.dest: a for a in parser._actions}
    for field in rundir.NAME_FIELDS:
        value = _another_value(actions[field], getattr(base_cfg, field))
        changed = rundir.run_name(dataclasses.replace(base_cfg, **{field: value}), defaults)
        assert changed != base, f"--{field} is listed as named but does not change the name"
    for field in ("dataset", "model", "attack", "attack_init", "eps", "grad_align_cos_lambda", "seed"):
        value = _another_value(actions[field], getattr(base_cfg, field))
        assert rundir.run_name(dataclasses.replace(base_cfg, **{field: value}), defaults) != base, field


# ------------------------------------------------------------------------------- bad input, no writes
def _corrupt_cifar(root):
    write_cifar10(root, [[0, 1]] * 5, [0, 1])
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage, not a pickle")
    return "cifar10", str(root / "cifar-10-batches-py" / "data_batch_2")


def _truncated_svhn(root):
    write_svhn(root, [1, 2], [1, 2])
    path = root / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:200])
    return "svhn", str(path)


@pytest.mark.parametrize("damage", [_corrupt_cifar, _truncated_svhn])
def test_an_unreadable_dataset_file_is_named_in_one_line_exit_2_no_run_dir(tmp_path, capsys, damage):
    dataset, path = damage(tmp_path / "data")
    args = ["--dataset", dataset, "--model", "cnn", "--data_dir", str(tmp_path / "data"), "--device", "cpu",
            "--out_dir", str(tmp_path / "runs")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert path in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flag", [["--lr_max", "-1"], ["--weight_decay", "-0.1"], ["--lr_max", "nan"]])
def test_values_the_optimiser_rejects_exit_2_before_any_write(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out_dir", str(tmp_path / "runs"), *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag[0] in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")
