"""Runs on a shared cluster: the lease lock across hosts and processes, signals (SIGKILL, SIGTERM,
Ctrl-C), Slurm requeue through submitit, launch.py --status, and damaged, foreign or impossible run
directories (a deleted lock, a full disk, a file-size limit, permissions): one line naming the problem
and the fix, the documented exit code, and nothing written, lost or interleaved.

This suite runs as root in CI containers, and root bypasses permission bits: the permission cases
simulate the denial (os.access answering no, or an open raising PermissionError) instead of chmod.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import config
import eval as eval_py
import launch
import lease
import report
import rundir
import train
import utils
from tests.fixtures import (
    FGSM_RUN,
    ROOT,
    RUN,
    TINY,
    Interrupt,
    comparable,
    edit_json,
    eval_main,
    one_line,
    read_metrics,
    report_main,
    run_dir_of,
    snapshot,
    stop_after_epoch,
)


def copy_run(run_dir: str, root, name: str | None = None) -> str:
    """A copy of run_dir under root (as root/<name>, the run's own name by default)."""
    target = os.path.join(str(root), name or os.path.basename(run_dir))
    shutil.copytree(run_dir, target)
    return target


# --------------------------------------------------------------------------------------------- eval.py
def test_23_ctrl_c_in_eval_is_one_line(finished, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_py, "evaluate", interrupted)
    code, out, err = eval_main(capsys, "--model_path", os.path.join(finished, "model.pth"))
    assert code == rundir.EXIT_INTERRUPTED == 130 and out == ""
    assert one_line(err).startswith("eval.py: interrupted (Ctrl-C)")


# ------------------------------------------------------------------------------------------- report.py
def test_3_report_does_not_file_a_run_whose_config_json_disagrees(finished, tmp_path, capsys):
    root = tmp_path / "runs"
    good = copy_run(finished, root)
    edited = copy_run(finished, root, "edited")
    os.rename(edited, edited := os.path.join(root, os.path.basename(good).replace("seed0", "seed1")))
    edit_json(os.path.join(edited, "config.json"), eps=8.0, seed=1)  # edited to look like eps 8, seed 1
    renamed = copy_run(finished, root, "renamed")  # the right settings in a folder of another name
    code, out, err = report_main(capsys, str(root), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "1 finished runs in 1 groups, 0 skipped, 2 not counted" in out
    (row,) = report.aggregate(report.collect_runs([str(root)]))
    assert (row["eps"], row["n_seeds"], row["seeds"]) == (76, 1, "0")  # only the good run; nothing filed at eps 8
    section = open(tmp_path / "out" / "report.md").read().split("## Settings that do not match the run")[1]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == 2
    assert lines[0].startswith(f"- {os.path.basename(edited)}: config.json says eps 8, final.json 76")
    assert lines[1].startswith(f"- renamed: its settings name the run {os.path.basename(good)}")
    assert all("--overwrite" in line for line in lines)
    assert os.path.basename(renamed) not in report.markdown(report.aggregate(report.collect_runs([good])))


@pytest.mark.parametrize("edit, said", [({"eps": 8.0}, "says eps 8, but the run (its name and final.json) has eps 76"),
                                        ({"lr_max": 0.3, "seed": 2}, "says seed 2, lr_max 0.3, but the run (its name "
                                                                     "and final.json) has seed 0, lr_max 0.01"),
                                        (None, "is damaged (not a JSON object)")])
def test_train_does_not_call_a_run_finished_when_its_config_json_disagrees(finished, tmp_path, cli, edit, said):
    root = tmp_path / "runs"
    run_dir = copy_run(finished, root)
    assert cli("train.py", *TINY, *FGSM_RUN, "--out_dir", root).out.endswith("nothing to do; --overwrite retrains it\n")
    if edit is None:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write("[]")
    else:
        edit_json(os.path.join(run_dir, "config.json"), **edit)
    before = snapshot(root)
    proc = cli("train.py", *TINY, *FGSM_RUN, "--out_dir", root)
    assert proc.code == 2 and proc.out == ""
    assert one_line(proc.err) == (f"train.py: error: {run_dir}/config.json {said}"
                                  + (": config.json was edited" if edit else "")
                                  + "; restore config.json (its argv is the command) or relaunch with --overwrite to "
                                  "retrain")
    assert snapshot(root) == before


def write_final(run_dir: str, text: str) -> None:
    with open(os.path.join(run_dir, "final.json"), "w") as f:
        f.write(text)


@pytest.mark.parametrize("content", ["truncated", "{}", "[]", '{"eps": 76, "last": {"clean_acc": 0.5}}'])
def test_9_17_report_lists_a_damaged_final_json_in_its_own_row(finished, tmp_path, capsys, content):
    root = tmp_path / "runs"
    run_dir = copy_run(finished, root)
    whole = open(os.path.join(run_dir, "final.json")).read()
    write_final(run_dir, whole[: len(whole) // 2] if content == "truncated" else content)
    before = snapshot(root)
    code, out, err = report_main(capsys, str(root), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err  # no group to report
    assert "0 finished runs in 0 groups, 0 skipped, 1 not counted" in out
    damaged = open(tmp_path / "out" / "report.md").read().split("## Damaged (not counted)")[1].strip()
    line = one_line(damaged)
    assert line.startswith(f"- {os.path.basename(run_dir)}: {run_dir}/final.json is damaged (")
    assert line.endswith("relaunch its command with --overwrite to retrain the run")
    assert "## Skipped" not in open(tmp_path / "out" / "report.md").read()
    assert snapshot(root) == before


def test_16_a_damaged_middle_line_of_metrics_jsonl_is_skipped_and_counted(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "runs")
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    assert len(lines) >= 3
    damaged = [*lines[:1], '{"epoch": 0, "itera\n', *lines[1:], '{"epoch": 9, "iterat']  # and a torn last line
    with open(path, "w") as f:
        f.writelines(damaged)
    records, skipped = rundir.read_jsonl_records(path)
    assert len(records) == len(lines) and skipped == [2]  # the torn last line is not counted as damaged
    code, out, err = report_main(capsys, "--curves", run_dir, "--out", str(tmp_path / "out"))
    assert code == 0 and "curves.png" in out
    assert one_line(err) == (f"report.py: warning: {path}: skipped 1 damaged line(s) (2); "
                             "the curves leave them out")
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_23_ctrl_c_in_report_is_one_line(finished, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "collect_runs", interrupted)
    code, out, err = report_main(capsys, os.path.dirname(finished), "--out", str(tmp_path / "out"))
    assert code == 130 and out == "" and one_line(err).startswith("report.py: interrupted (Ctrl-C)")


# ------------------------------------------------------------------------------------------- launch.py
def train_command(out_dir, *extra: str) -> str:
    return shlex.join(["python", "train.py", *TINY, *FGSM_RUN, "--out_dir", str(out_dir), *extra])


def launch_main(capsys, tmp_path, lines: list[str], *args: str) -> tuple[int, str, str]:
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = launch.main([str(commands), "--log_dir", str(tmp_path / "logs"), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_8_same_flags_in_two_out_dirs_get_two_logs_and_status_reads_its_own(tmp_path, capsys):
    lines = [train_command(tmp_path / "a"), train_command(tmp_path / "b")]
    a, b = launch.make_tasks(launch.read_commands(lines), str(tmp_path / "logs"), None)
    assert os.path.basename(a.run_dir) == os.path.basename(b.run_dir) and a.log_path != b.log_path
    launch.run_command([sys.executable, "-c", "import sys; sys.exit(2)"], a.log_path)  # a failed; b never ran
    code, out, _ = launch_main(capsys, tmp_path, lines, "--status")
    assert code == 1
    assert out.splitlines() == ["2 runs: 0 finished, 0 in progress, 0 interrupted, 1 failed, 0 damaged, 1 not started",
                                f"FAILED {a.run_dir}: exit 2 (bad input); log {a.log_path}",
                                f"NOT STARTED {b.run_dir}"]


def test_9_status_names_a_damaged_final_json_and_a_lock_folder(finished, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    torn, locked = copy_run(finished, out_dir), copy_run(finished, tmp_path / "other")
    whole = open(os.path.join(torn, "final.json")).read()
    write_final(torn, whole[:-10])
    os.remove(os.path.join(locked, "final.json"))
    os.mkdir(os.path.join(locked, ".lock"))
    before = snapshot(tmp_path)
    code, out, _ = launch_main(capsys, tmp_path, [train_command(out_dir), train_command(tmp_path / "other")],
                               "--status")
    assert code == 1
    assert out.splitlines() == [
        "2 runs: 0 finished, 0 in progress, 0 interrupted, 0 failed, 2 damaged, 0 not started",
        (f"DAMAGED {torn}: {torn}/final.json is damaged (not whole JSON: truncated?); relaunch its command with "
         "--overwrite to retrain the run"),
        f"DAMAGED {locked}: {locked}/.lock is a folder, not a lock file; remove it (rmdir {locked}/.lock) and relaunch"]
    after = snapshot(tmp_path)
    after.pop("commands.txt")
    assert after == before


def test_23_ctrl_c_in_launch_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(launch, "run_local", interrupted)
    code, _, err = launch_main(capsys, tmp_path, [train_command(tmp_path / "runs")])
    assert code == 130 and one_line(err).startswith("launch.py: interrupted (Ctrl-C)")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_23_sigterm_to_launch_stops_its_children_and_waits_for_them(tmp_path):
    out_dir = tmp_path / "runs"
    lines = [train_command(out_dir, "--epochs", "5000", "--seed", str(s)) for s in range(3)]
    (tmp_path / "commands.txt").write_text("\n".join(lines) + "\n")
    tasks = launch.make_tasks(launch.read_commands(lines), str(tmp_path / "logs"), None)
    sweep = subprocess.Popen([sys.executable, "launch.py", str(tmp_path / "commands.txt"), "--jobs", "2",
                              "--log_dir", str(tmp_path / "logs")], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        locks = [os.path.join(t.run_dir, ".lock") for t in tasks[:2]]
        deadline = time.time() + 120
        while not all(os.path.exists(p) for p in locks) and time.time() < deadline:
            time.sleep(0.1)
        children = [lease.read_lock(p)[0].pid for p in locks]
        assert sweep.poll() is None
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, err
    assert one_line(err) == ("launch.py: stopped by SIGTERM; stopped 2 running command(s), 1 not started: "
                             "relaunch the same commands to resume")
    for pid in children:  # ended (and reaped) before launch.py did
        assert not os.path.exists(f"/proc/{pid}")
    for task in tasks[:2]:
        assert not os.path.exists(os.path.join(task.run_dir, ".lock"))  # train.py freed its lock
        assert open(task.log_path).read().rstrip().endswith(f"{launch.EXIT_MARK}-{int(signal.SIGTERM)}")
    assert not os.path.exists(tasks[2].run_dir) and not os.path.exists(tasks[2].log_path)


def launch_train(out_dir, *extra: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """train.py in a subprocess; fault: ("--kill_at", N) or ("--nan_at", N) runs it through
    tests/faulty_train.py, which injects that fault at global iteration N."""
    script = [os.path.join("tests", "faulty_train.py"), *fault, "train.py"] if fault else ["train.py"]
    return subprocess.run([sys.executable, *script, *RUN, "--out_dir", str(out_dir), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_on_another_node_gives_the_uninterrupted_result(tmp_path, tiny_run, cli):
    whole = tiny_run(*RUN[len(TINY):])
    killed = launch_train(tmp_path / "cut", fault=("--kill_at", "7"))  # mid epoch 2
    assert killed.returncode == -9
    run_dir = run_dir_of(tmp_path / "cut", RUN)
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    assert torch.load(os.path.join(run_dir, train.RESUME_FILE), weights_only=False)["next_epoch"] == 2
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "iterat')  # a torn last line, as a crash mid-write would leave
    # The killed run's lock stays behind; as if it had run on another node, silent for longer than the lease:
    stale = {"host": "node-a17", "pid": 4242, "since": "2026-01-01T00:00:00Z", "pid_ns": None}
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        json.dump(stale, f)
    os.utime(os.path.join(run_dir, ".lock"), (time.time() - lease.LEASE_SECONDS - 60,) * 2)
    resumed = cli("train.py", *RUN, "--out_dir", tmp_path / "cut")  # in-process: one thread, as the killed run
    assert resumed.code == 0, resumed.err
    assert "resuming" in resumed.out
    assert comparable(run_dir) == comparable(whole.run_dir)
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-") or n == ".lock"]


def test_a_live_lock_refuses_a_second_launch_with_exit_3(tmp_path, cli):
    run_dir = run_dir_of(tmp_path, RUN)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")  # this test process: alive
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 3
    assert str(os.getpid()) in proc.err and "in progress" in proc.err
    assert sorted(os.listdir(run_dir)) == [".lock"]


def test_a_dead_processs_lock_is_taken_over(tmp_path, cli):
    dead = subprocess.run([sys.executable, "-S", "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)  # a pid that has ended (-S: no site packages, a few milliseconds)
    run_dir = run_dir_of(tmp_path, RUN)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        f.write(f"{socket.gethostname()} {int(dead.stdout)}")
    assert cli("train.py", *RUN, "--out_dir", tmp_path).code == 0
    assert os.path.exists(os.path.join(run_dir, "final.json"))


@pytest.mark.slow
def test_a_second_launch_during_a_run_exits_3_and_touches_nothing(tmp_path, cli):
    args = [*RUN, "--epochs", "200", "--out_dir", str(tmp_path)]
    first = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(run_dir_of(tmp_path, args), ".lock")
        deadline = time.time() + 120
        while not os.path.exists(lock) and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and os.path.exists(lock)
        # (an atomic write of the first run in flight may show its .tmp- file for a moment: not a file of the run)
        before = sorted(n for n in os.listdir(os.path.dirname(lock)) if not n.startswith(".tmp-"))
        second = cli("train.py", *args)  # the same command, in this process
        assert first.poll() is None  # the first was still training the whole time
    finally:
        first.kill()
        first.wait()
    assert second.code == 3, second.err
    assert "in progress" in second.err and f"pid {first.pid}" in second.err
    assert len(second.err_lines) == 1
    assert set(before) <= set(os.listdir(os.path.dirname(lock)))  # nothing of the first run removed


def test_run_lock_is_exclusive_and_released(tmp_path):
    first, second = lease.RunLock(str(tmp_path)), lease.RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(lease.RunLocked, match=str(os.getpid())):
        second.acquire()
    assert os.listdir(tmp_path) == [".lock"]  # no temporary file left behind
    first.release()
    second.acquire()
    second.release()
    assert os.listdir(tmp_path) == []


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
# (a SIGKILLed run whose stale lock names another node: the SIGKILL kill-and-resume test in this file)
def test_recent_lock_naming_another_host_exits_3_and_writes_nothing(tmp_path, capsys):
    args = TINY + ["--out_dir", str(tmp_path)]
    cfg, defaults = config.parse_config(args)
    run_dir = os.path.join(str(tmp_path), rundir.run_name(cfg, defaults))
    lock = write_lock(run_dir, "node-a17", 4242, age_s=lease.LEASE_SECONDS - 30)
    before = open(lock).read()
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "pid 4242 on node-a17" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(run_dir) == [".lock"] and open(lock).read() == before


def test_lock_names_its_holder_is_refreshed_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.5)  # refreshed every 0.1 s
    lock = lease.RunLock(str(tmp_path))
    lock.acquire()
    try:
        owner, _ = lease.read_lock(lock.path)
        assert (owner.host, owner.pid, owner.since[:2]) == (os.uname().nodename, os.getpid(), "20")
        os.utime(lock.path, (0, 0))  # as if last refreshed in 1970
        time.sleep(0.4)
        assert time.time() - os.stat(lock.path).st_mtime < 0.3  # the heartbeat refreshed it
        with pytest.raises(lease.RunLocked, match=f"pid {os.getpid()} on "):
            lease.RunLock(str(tmp_path)).acquire()
        assert lease.live_lock_owner(str(tmp_path)).pid == os.getpid()
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []
    assert lease.live_lock_owner(str(tmp_path)) is None


@pytest.mark.parametrize("content", ["", "{half a lock", '{"host": "node-a17"}'])
def test_an_unreadable_lock_is_never_taken_for_a_live_one(tmp_path, content):
    with open(tmp_path / ".lock", "w") as f:
        f.write(content)  # fresh mtime, but names no holder
    lock = lease.RunLock(str(tmp_path))
    lock.acquire()
    assert lease.read_lock(lock.path)[0].pid == os.getpid()
    lock.release()


def test_a_lock_taken_over_meanwhile_is_put_back_and_a_lost_lock_is_reported(tmp_path, monkeypatch):
    # Two contenders saw the same stale lock; the first replaced it. The second's rename-aside then
    # catches the first's fresh lock: it must link it back, not remove it.
    holder = lease.RunLock(str(tmp_path))
    holder.acquire()
    inode = os.stat(holder.path).st_ino
    holder._set_aside(inode + 1, holder.path + ".stale.test")  # judged stale: a lock with another inode
    assert os.stat(holder.path).st_ino == inode and os.listdir(tmp_path) == [".lock"]
    holder.release()
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.25)
    lost = threading.Event()
    lock = lease.RunLock(str(tmp_path), on_lost=lost.set)
    lock.acquire()
    os.remove(lock.path)  # another process judged it stale and took over
    write_lock(str(tmp_path), "node-a17", 4242, age_s=0)
    assert lost.wait(5) and not lock.held
    lock.release()
    assert lease.read_lock(lock.path)[0].host == "node-a17"  # the new holder's lock is left alone


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
        child = lease.read_lock(os.path.join(run_dir, ".lock"))[0].pid
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


EXTRA = RUN[len(TINY):]  # RUN = TINY + FGSM with GradAlign, 3 epochs (iterations 0..12)


def interrupted_run(out_dir, *extra: str, after_epoch: int = 1) -> str:
    """RUN + extra trained in-process under out_dir and stopped right after resume.pt of epoch
    `after_epoch` was written (as a kill then would leave it); returns the run directory."""
    with pytest.MonkeyPatch.context() as mp:
        stop_after_epoch(mp, after_epoch)
        with pytest.raises(Interrupt):
            train.main([*RUN, *extra, "--out_dir", str(out_dir)])
    return run_dir_of(out_dir, [*RUN, *extra])


def resume_path(run_dir: str) -> str:
    return os.path.join(run_dir, rundir.RESUME_FILE)


# ----------------------------------------------------------------------- 1: a lock that cannot be shared
def test_1_a_deleted_lock_stops_the_run_at_its_next_write_exit_3(tmp_path, cli, monkeypatch):
    run_dir = run_dir_of(tmp_path, RUN)
    append = rundir.append_jsonl
    written = []

    def append_then_delete_the_lock(path, obj):
        append(path, obj)
        written.append(obj["iteration"])
        if len(written) == 2:
            os.remove(os.path.join(run_dir, ".lock"))  # what a user told "in progress" tries first
    monkeypatch.setattr(rundir, "append_jsonl", append_then_delete_the_lock)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 3
    assert one_line(proc.err) == (f"train.py: the lock {run_dir}/.lock is no longer this process's (deleted or "
                                  "taken over); stopping without writing; relaunch to resume")
    assert [r["iteration"] for r in read_metrics(run_dir)] == written == [0, 2]  # nothing written after the deletion
    assert not os.path.exists(os.path.join(run_dir, ".lock"))  # the lock is not re-created by the loser
    assert not os.path.exists(os.path.join(run_dir, "final.json"))


def test_1_a_lock_deleted_while_no_write_happens_is_noticed_by_the_refreshing_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.25)  # refreshed every 0.05 s
    with pytest.raises(lease.LockLost, match="no longer this process's"), \
            rundir.exclusive_run(str(tmp_path), "train.py"):
        os.remove(os.path.join(tmp_path, ".lock"))
        time.sleep(5)  # the refreshing thread stops this through SIGTERM, long before the end
    with pytest.raises(lease.LockLost):  # and confirm() of a lock lost that way fails too
        lock = lease.RunLock(str(tmp_path))
        lock.acquire()
        os.remove(lock.path)
        try:
            lock.confirm()
        finally:
            lock.release()
    assert os.listdir(tmp_path) == []


SLOW_TRAIN = ("import sys, time; sys.path.insert(0, '.'); import train; step = train.train_step\n"
              "def slow(*a, **k):\n    time.sleep(0.15); return step(*a, **k)\n"
              "train.train_step = slow; sys.exit(train.main(sys.argv[1:]))")


@pytest.mark.slow
def test_1_two_real_processes_on_one_run_never_interleave(tmp_path, tiny_run):
    whole = tiny_run(*EXTRA)
    run_dir = run_dir_of(tmp_path, RUN)
    first = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *RUN, "--out_dir", str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while rundir.count_jsonl_lines(metrics) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.remove(os.path.join(run_dir, ".lock"))
    second = subprocess.run([sys.executable, "train.py", *RUN, "--out_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 3, first_err
    assert one_line(first_err).startswith(f"train.py: the lock {run_dir}/.lock is no longer this process's")
    assert second.returncode == 0, second.stderr
    iterations = [r["iteration"] for r in read_metrics(run_dir)]
    assert iterations == sorted(set(iterations))  # no duplicate or out-of-order record
    assert comparable(run_dir) == comparable(whole.run_dir)


# ------------------------------------------------------------------ 2: run state that knows its run
def test_2_another_runs_resume_pt_is_refused_before_anything_changes(tmp_path, cli):
    mine = interrupted_run(tmp_path / "a")
    other = interrupted_run(tmp_path / "b", "--seed", "1")
    shutil.copy(resume_path(other), resume_path(mine))
    before = snapshot(mine)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path / "a")
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: {resume_path(mine)} belongs to run {os.path.basename(other)}; "
                                  "remove it or relaunch with --overwrite")
    assert snapshot(mine) == before  # metrics.jsonl not rewound, nothing written


def test_2_resume_pt_and_final_json_carry_the_run_name_and_an_exact_settings_hash(tmp_path, tiny_run):
    run_dir = interrupted_run(tmp_path)
    saved = torch.load(resume_path(run_dir), weights_only=False)
    cfg, defaults = train.parse_config(RUN)
    assert saved["run_name"] == os.path.basename(run_dir) == train.run_name(cfg, defaults)
    assert saved["settings_hash"] == rundir.settings_hash(cfg)
    final = tiny_run(*EXTRA).final
    assert (final["run_name"], final["settings_hash"]) == (saved["run_name"], saved["settings_hash"])
    # the hash sees what the name sees, exactly, and nothing the name leaves out
    other, _ = train.parse_config([*RUN, "--lr_max", "0.0100000001"])
    moved, _ = train.parse_config([*RUN, "--out_dir", "elsewhere", "--device", "auto"])
    assert rundir.settings_hash(other) != rundir.settings_hash(cfg) == rundir.settings_hash(moved)


def test_2_a_resume_pt_with_settings_of_another_run_under_the_same_name_is_refused(tmp_path, cli):
    run_dir = interrupted_run(tmp_path)
    saved = torch.load(resume_path(run_dir), weights_only=False)
    torch.save({**saved, "settings_hash": "0" * 64}, resume_path(run_dir))
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2 and "settings_hash differs" in one_line(proc.err)


def test_a_resume_that_would_change_the_layouts_is_refused(tmp_path, cli, monkeypatch):
    """--channels_last auto chooses per device type: a run resumed on another kind of device (simulated
    here by another table entry for the CPU) would mix two layouts, which round differently."""
    run_dir = interrupted_run(tmp_path)
    assert torch.load(resume_path(run_dir), weights_only=False)["layouts"] == {"train": "contiguous",
                                                                               "eval": "contiguous"}
    before = snapshot(tmp_path)
    monkeypatch.setitem(utils.LAYOUTS, ("cpu", "cnn"), {"train": False, "eval": True})
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    assert one_line(proc.err) == (
        f"train.py: error: {resume_path(run_dir)} was trained with the layouts train contiguous, eval contiguous, "
        "but --channels_last gives train contiguous, eval channels_last here (auto chooses per device type): resume "
        "it on the kind of device that started it (config.json's device_used), or relaunch with --overwrite to start "
        "over")
    assert snapshot(tmp_path) == before  # metrics.jsonl not rewound, nothing written


def test_channels_last_on_or_off_is_another_run_and_auto_keeps_the_names(tmp_path, cli, tiny_run):
    finished = tiny_run(*EXTRA)
    assert not {"clon", "cloff"} & set(os.path.basename(finished.run_dir).split("_"))  # auto: not named
    out = tmp_path / "runs"
    shutil.copytree(finished.run_dir, out / os.path.basename(finished.run_dir))
    cfg, _ = train.parse_config([*RUN, "--channels_last", "on"])
    on = run_dir_of(out, [*RUN, "--channels_last", "on"])
    assert os.path.basename(on) == os.path.basename(finished.run_dir).replace("_seed0", "_clon_seed0")
    assert rundir.settings_hash(cfg) != finished.final["settings_hash"]
    proc = cli("train.py", *RUN, "--channels_last", "on", "--out_dir", out)
    assert proc.code == 0 and "is finished" not in proc.out  # trained: not taken for the contiguous run
    assert json.load(open(os.path.join(on, "final.json")))["eval_layout"] == "channels_last"


def test_2_another_runs_final_json_is_named_by_train_report_and_status(tmp_path, cli, capsys, tiny_run):
    other = tiny_run(*EXTRA, "--seed", "1")
    run_dir = run_dir_of(tmp_path, RUN)
    os.makedirs(run_dir)
    shutil.copy(other.path("final.json"), run_dir)
    shutil.copy(tiny_run(*EXTRA).path("config.json"), run_dir)
    before = snapshot(tmp_path)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: {run_dir}/final.json belongs to run "
                                  f"{os.path.basename(other.run_dir)}; remove it or relaunch with --overwrite")
    assert snapshot(tmp_path) == before
    run = report.read_run(run_dir)
    assert not run.counted and f"final.json belongs to run {os.path.basename(other.run_dir)}" in run.mismatch
    task = launch.make_tasks([["python", "train.py", *RUN, "--out_dir", str(tmp_path)]], str(tmp_path / "logs"),
                             None)[0]
    state, detail = launch.run_state(task)
    assert state == "damaged" and "belongs to run" in detail


# ------------------------------------------------------------------------ 9: a damaged final.json
@pytest.mark.parametrize("content", ['{"last": {"clean_acc": 0.5', "{}", "[]"])
def test_9_a_damaged_final_json_is_an_error_naming_the_fix_nothing_written(tmp_path, cli, tiny_run, content):
    run_dir = os.path.join(tmp_path, os.path.basename(tiny_run(*EXTRA).run_dir))
    shutil.copytree(tiny_run(*EXTRA).run_dir, run_dir)
    with open(os.path.join(run_dir, "final.json"), "w") as f:
        f.write(content)
    before = snapshot(tmp_path)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    line = one_line(proc.err)
    assert line.startswith(f"train.py: error: {run_dir}/final.json is damaged") and line.endswith(rundir.DAMAGED_FIX)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 10: config.json deleted mid-run
def test_10_a_config_json_deleted_mid_run_is_written_again_on_resume(tmp_path, cli, capsys):
    run_dir = interrupted_run(tmp_path / "runs")
    with open(os.path.join(run_dir, "config.json")) as f:
        written = json.load(f)
    os.remove(os.path.join(run_dir, "config.json"))
    assert cli("train.py", *RUN, "--out_dir", tmp_path / "runs").code == 0
    with open(os.path.join(run_dir, "config.json")) as f:
        rewritten = json.load(f)
    assert {k: v for k, v in rewritten.items() if k != "argv"} == {k: v for k, v in written.items() if k != "argv"}
    proc = cli("report.py", tmp_path / "runs", "--out", tmp_path / "out")
    assert proc.code == 0 and "1 finished runs in 1 groups, 0 skipped" in proc.out


# ------------------------------------------------------------------------ 14: permissions
def refused_leaving_all_as_it_was(cli, out_dir, before: dict) -> str:
    """Relaunches RUN into out_dir; asserts exit 2 and that out_dir still holds exactly `before` (a
    snapshot); returns the one error line."""
    proc = cli("train.py", *RUN, "--out_dir", out_dir)
    assert proc.code == 2
    assert snapshot(out_dir) == before
    return one_line(proc.err)


def test_14_a_run_dir_this_user_cannot_write_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    run_dir = interrupted_run(tmp_path)
    before = snapshot(tmp_path)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == run_dir else access(path, mode))
    line = refused_leaving_all_as_it_was(cli, tmp_path, before)
    assert line.startswith(f"train.py: error: cannot write {run_dir} (owner ")
    assert line.endswith("run as its owner or chmod g+w, or pick another --out_dir")


@pytest.mark.parametrize("name, mode, verb",
                         [(rundir.RESUME_FILE, os.R_OK, "read"), ("metrics.jsonl", os.W_OK, "write")])
def test_14_an_unreadable_resume_pt_or_a_read_only_file_is_one_line_exit_2(tmp_path, cli, monkeypatch, name, mode,
                                                                           verb):
    run_dir = interrupted_run(tmp_path)
    target = os.path.join(run_dir, name)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, m: False if path == target and m & mode else access(path, m))
    line = refused_leaving_all_as_it_was(cli, tmp_path, snapshot(tmp_path))
    assert line.startswith(f"train.py: error: cannot {verb} {target} (owner ")


def test_14_permission_denied_at_lock_time_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    run_dir = interrupted_run(tmp_path)
    before = snapshot(tmp_path)

    def denied(path, *args, **kwargs):
        if ".lock" in os.path.basename(str(path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(lease, "open", denied, raising=False)
    line = refused_leaving_all_as_it_was(cli, tmp_path, before)
    assert line.startswith(f"train.py: error: cannot write {run_dir} (owner ")
    assert not [n for n in os.listdir(run_dir) if n.startswith(".lock")]


# ------------------------------------------------------------------------ 15: a damaged resume.pt
@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_15_a_damaged_resume_pt_is_named_with_the_fix_before_anything_changes(tmp_path, cli, damage):
    run_dir = interrupted_run(tmp_path)
    path = resume_path(run_dir)
    if damage == "foreign":
        torch.save({"model": {}}, path)
    else:
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(content[:len(content) // 2] if damage == "truncated" else b"")
    line = refused_leaving_all_as_it_was(cli, tmp_path, snapshot(tmp_path))
    assert line.startswith(f"train.py: error: {path} is damaged (")
    assert line.endswith("relaunch with --overwrite to start over")
    assert cli("train.py", *RUN, "--out_dir", tmp_path, "--overwrite").code == 0  # the fix it names works


# ------------------------------------------------------------- 16: a damaged middle line of metrics.jsonl
def test_16_a_damaged_middle_line_of_metrics_jsonl_is_counted_and_kept_not_fatal(tmp_path, cli, tiny_run):
    run_dir = interrupted_run(tmp_path)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    lines[1] = b'{"epoch": 1, "iter\xff\n'  # a whole line that is not JSON (nor UTF-8)
    with open(path, "wb") as f:
        f.writelines(lines)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 0, proc.err
    assert f"warning: {path} has 1 damaged line(s) (line 2); kept as they are" in proc.out
    records, damaged = rundir.read_jsonl_records(path)
    whole = read_metrics(tiny_run(*EXTRA).run_dir)
    assert damaged == [2] and len(records) == len(whole) - 1
    untimed = {"elapsed_s", "train_minutes"}
    assert ([{k: v for k, v in r.items() if k not in untimed} for r in records]
            == [{k: v for k, v in r.items() if k not in untimed} for i, r in enumerate(whole) if i != 1])


# --------------------------------------------------------------------- 20: a full disk, a size limit
def test_20_a_full_disk_at_lock_time_leaves_no_lock_file_and_relaunch_resumes(tmp_path, cli, monkeypatch, tiny_run):
    run_dir = interrupted_run(tmp_path)

    class FullDisk:
        def __init__(self, path):
            self.file = open(path, "w")  # created, as on a full disk: then nothing fits

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device", self.file.name)

        def __exit__(self, *exc):
            self.file.close()
    monkeypatch.setattr(lease, "open", lambda path, *a, **k: FullDisk(path) if ".lock" in str(path)
                        else open(path, *a, **k), raising=False)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 1
    line = one_line(proc.err)
    assert line.startswith(f"train.py: error: cannot write {run_dir}/.lock.") and line.endswith(
        "(No space left on device); free space or raise the limit, then relaunch to resume")
    assert not [n for n in os.listdir(run_dir) if n.startswith(".lock")]
    monkeypatch.undo()
    assert cli("train.py", *RUN, "--out_dir", tmp_path).code == 0
    assert comparable(run_dir) == comparable(tiny_run(*EXTRA).run_dir)


def test_20_a_full_disk_at_a_metrics_append_is_one_line_and_relaunch_resumes(tmp_path, cli, monkeypatch, tiny_run):
    run_dir = run_dir_of(tmp_path, RUN)
    calls = []

    def opener(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and args[:1] == ("a",):
            calls.append(path)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(rundir, "open", opener, raising=False)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 1
    assert one_line(proc.err) == (f"train.py: error: cannot write {run_dir}/metrics.jsonl (No space left on device); "
                                  "free space or raise the limit, then relaunch to resume")
    assert not [n for n in os.listdir(run_dir) if n.startswith((".lock", ".tmp-"))]
    monkeypatch.undo()
    resumed = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert resumed.code == 0 and "resuming" in resumed.out
    assert comparable(run_dir) == comparable(tiny_run(*EXTRA).run_dir)


@pytest.mark.slow
def test_20_a_file_size_limit_is_one_line_not_a_kill(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # resume.pt (tens of KB) does not fit
    proc = subprocess.run([sys.executable, "train.py", *RUN, "--out_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "(File too large); free space or raise the limit, then relaunch to resume" in line
    run_dir = run_dir_of(tmp_path, RUN)
    assert not [n for n in os.listdir(run_dir) if n.startswith((".lock", ".tmp-"))]


# ----------------------------------------------------------------- 22: what a stop signal says is on disk
def test_22_the_stop_line_names_only_what_is_on_disk(tmp_path):
    assert rundir.resume_hint(str(tmp_path)) == (f"no epoch of {tmp_path} had finished: relaunching the same "
                                                 "command starts it over")
    open(resume_path(str(tmp_path)), "w").close()
    assert rundir.resume_hint(str(tmp_path)).startswith(f"{tmp_path}/{rundir.RESUME_FILE} holds the last finished")
    os.remove(resume_path(str(tmp_path)))
    open(os.path.join(tmp_path, "final.json"), "w").close()
    hint = rundir.resume_hint(str(tmp_path))
    assert hint == f"{tmp_path}/final.json keeps the finished run's results: the run is complete"
    (tmp_path / "config.json").write_text(json.dumps({"final_autoattack": True}))
    hint = rundir.resume_hint(str(tmp_path))
    assert "final.json keeps the finished run's results (an AutoAttack addition" in hint
    assert rundir.RESUME_FILE not in hint


@pytest.mark.slow
def test_22_sigterm_during_an_autoattack_addition_does_not_name_a_missing_resume_pt(tmp_path):
    (tmp_path / "final.json").write_text("{}")
    code = ("import os, signal, sys, time; sys.path.insert(0, '.'); import rundir\n"
            f"with rundir.exclusive_run({str(tmp_path)!r}, 'train.py'):\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -15
    line = one_line(proc.stderr)
    assert line.startswith("train.py: stopped by SIGTERM; ") and rundir.RESUME_FILE not in line
    assert os.listdir(tmp_path) == ["final.json"]


# ------------------------------------------------------------------ 23: a .lock folder, Ctrl-C
def test_23_a_lock_that_is_a_folder_is_one_line_exit_2(tmp_path, cli):
    run_dir = interrupted_run(tmp_path)
    os.mkdir(os.path.join(run_dir, ".lock"))
    before = snapshot(tmp_path)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: {run_dir}/.lock is a folder, not a lock file; remove it "
                                  f"(rmdir {run_dir}/.lock) and relaunch")
    assert snapshot(tmp_path) == before and os.path.isdir(os.path.join(run_dir, ".lock"))


def test_23_ctrl_c_ends_with_one_line_releases_the_lock_and_resumes(tmp_path, cli, monkeypatch, tiny_run):
    run_dir = run_dir_of(tmp_path, RUN)
    stop_after_epoch(monkeypatch, 1, KeyboardInterrupt)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 130
    assert one_line(proc.err) == (f"train.py: interrupted (Ctrl-C); {run_dir}/{rundir.RESUME_FILE} holds the last "
                                  "finished epoch: relaunch the same command to resume")
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    assert not [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]
    monkeypatch.undo()
    assert cli("train.py", *RUN, "--out_dir", tmp_path).code == 0
    assert comparable(run_dir) == comparable(tiny_run(*EXTRA).run_dir)
