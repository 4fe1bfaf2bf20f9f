"""Damaged, foreign or impossible input to train.py, and the run directory under stress (a deleted
lock, a full disk, a file-size limit, permissions, Ctrl-C): one line naming the problem and the fix,
the documented exit code, and nothing written, lost or interleaved.

This suite runs as root in CI containers, and root bypasses permission bits: the permission cases
simulate the denial (os.access answering no, or an open raising PermissionError) instead of chmod.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import launch
import report
import rundir
import train
from tests.fixtures import ROOT, RUN, TINY, comparable, read_metrics, run_dir_of
from tests.test_bad_input_tools import one_line, snapshot

EXTRA = RUN[len(TINY):]  # RUN = TINY + FGSM with GradAlign, 3 epochs (iterations 0..12)


class _Interrupt(Exception):
    pass


def interrupted_run(out_dir, *extra: str, after_epoch: int = 1) -> str:
    """RUN + extra trained in-process under out_dir and stopped right after resume.pt of epoch
    `after_epoch` was written (as a kill then would leave it); returns the run directory."""
    save = rundir.save_resume_state

    def save_then_stop(run_dir, state, generator):
        save(run_dir, state, generator)
        if state["next_epoch"] == after_epoch + 1:
            raise _Interrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "save_resume_state", save_then_stop)
        with pytest.raises(_Interrupt):
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
    monkeypatch.setattr(rundir, "LEASE_SECONDS", 0.25)  # refreshed every 0.05 s
    with pytest.raises(rundir.LockLost, match="no longer this process's"), \
            rundir.exclusive_run(str(tmp_path), "train.py"):
        os.remove(os.path.join(tmp_path, ".lock"))
        time.sleep(5)  # the refreshing thread stops this through SIGTERM, long before the end
    with pytest.raises(rundir.LockLost):  # and confirm() of a lock lost that way fails too
        lock = rundir.RunLock(str(tmp_path))
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


# ------------------------------------------------------------------------- 4: names keep every digit
def test_4_run_names_tell_apart_values_that_round_alike_and_keep_the_short_form():
    assert [rundir.name_number(v) for v in (0.01, 76.5, 5e-4, 1e-5, 30, 0.3, 2.0)] == [
        "0.01", "76.5", "0.0005", "1e-05", "30", "0.3", "2"]
    assert rundir.name_number(0.01234561) == "0.01234561" != rundir.name_number(0.01234564)
    assert rundir.name_number(1 / 3) == repr(1 / 3)
    for value in (0.01234561, 1 / 3, 123456789.0, 7):  # what a name says reads back as the value
        assert float(rundir.name_number(value)) == value
    names = {os.path.basename(run_dir_of("", [*RUN, "--lr_max", lr])) for lr in ("0.01234561", "0.01234564")}
    assert len(names) == 2
    names = {os.path.basename(run_dir_of("", [*RUN, "--eps", eps])) for eps in ("8.0000001", "8.0000004")}
    assert len(names) == 2


def test_4_a_run_whose_value_rounds_like_a_finished_ones_trains(tmp_path, cli):
    first = cli("train.py", *TINY, "--epochs", "0", "--lr_max", "0.01234561", "--out_dir", tmp_path)
    assert first.code == 0
    second = cli("train.py", *TINY, "--epochs", "0", "--lr_max", "0.01234564", "--out_dir", tmp_path)
    assert second.code == 0 and "is finished" not in second.out and len(os.listdir(tmp_path)) == 2


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


# ------------------------------------------------------------------ 12, 13, 21: flags caught up front
@pytest.mark.parametrize("device", ["tpu", "gpu", "mps", "meta", "cuda:x", "cpu:0"])
def test_12_a_device_other_than_cpu_or_cuda_is_one_line_exit_2_nothing_written(tmp_path, cli, device):
    proc = cli("train.py", *TINY, "--device", device, "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: --device {device} is not supported: use auto, cpu, cuda "
                                  "or cuda:N")
    assert not os.path.exists(tmp_path / "runs")
    proc = cli("eval.py", "--model_path", tmp_path / "none.pth", "--device", device, "--dataset", "digits")
    assert proc.code == 2
    assert one_line(proc.err).endswith(f"--device {device} is not supported: use auto, cpu, cuda or cuda:N")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1] (got -1)"),
    (["--seed", "4294967296"], "--seed must be in [0, 2**32 - 1] (got 4294967296)"),
    (["--pgd_alpha_train", "nan"], "--pgd_alpha_train must be a finite number (got nan)"),
    (["--lr_max", "inf"], "--lr_max must be a finite number (got inf)"),
    (["--eps=-inf"], "--eps must be a finite number (got -inf)"),
])
def test_13_21_a_seed_out_of_range_or_a_non_finite_number_is_one_line_exit_2(tmp_path, cli, flags, message):
    proc = cli("train.py", *TINY, *flags, "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err).startswith(f"train.py: error: {message}")
    assert not os.path.exists(tmp_path / "runs")


def test_13_the_largest_seed_trains(tmp_path, cli):
    assert cli("train.py", *TINY, "--epochs", "0", "--seed", str(2**32 - 1), "--out_dir", tmp_path).code == 0


# ------------------------------------------------------------------------ 14: permissions
def test_14_a_run_dir_this_user_cannot_write_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    run_dir = interrupted_run(tmp_path)
    before = snapshot(tmp_path)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == run_dir else access(path, mode))
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    line = one_line(proc.err)
    assert line.startswith(f"train.py: error: cannot write {run_dir} (owner ")
    assert line.endswith("run as its owner or chmod g+w, or pick another --out_dir")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, mode, verb",
                         [(rundir.RESUME_FILE, os.R_OK, "read"), ("metrics.jsonl", os.W_OK, "write")])
def test_14_an_unreadable_resume_pt_or_a_read_only_file_is_one_line_exit_2(tmp_path, cli, monkeypatch, name, mode,
                                                                           verb):
    run_dir = interrupted_run(tmp_path)
    target = os.path.join(run_dir, name)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, m: False if path == target and m & mode else access(path, m))
    before = snapshot(tmp_path)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    assert one_line(proc.err).startswith(f"train.py: error: cannot {verb} {target} (owner ")
    assert snapshot(tmp_path) == before


def test_14_permission_denied_at_lock_time_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    run_dir = interrupted_run(tmp_path)
    before = snapshot(tmp_path)

    def denied(path, *args, **kwargs):
        if ".lock" in os.path.basename(str(path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(rundir, "open", denied, raising=False)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    assert one_line(proc.err).startswith(f"train.py: error: cannot write {run_dir} (owner ")
    assert snapshot(tmp_path) == before and not [n for n in os.listdir(run_dir) if n.startswith(".lock")]


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
    before = snapshot(tmp_path)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 2
    line = one_line(proc.err)
    assert line.startswith(f"train.py: error: {path} is damaged (")
    assert line.endswith("relaunch with --overwrite to start over")
    assert snapshot(tmp_path) == before
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
    monkeypatch.setattr(rundir, "open", lambda path, *a, **k: FullDisk(path) if ".lock" in str(path)
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
    assert "final.json keeps the finished run's results" in hint and rundir.RESUME_FILE not in hint


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
    save = rundir.save_resume_state

    def save_then_ctrl_c(run_dir, state, generator):
        save(run_dir, state, generator)
        if state["next_epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(rundir, "save_resume_state", save_then_ctrl_c)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 130
    assert one_line(proc.err) == (f"train.py: interrupted (Ctrl-C); {run_dir}/{rundir.RESUME_FILE} holds the last "
                                  "finished epoch: relaunch the same command to resume")
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    assert not [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]
    monkeypatch.undo()
    assert cli("train.py", *RUN, "--out_dir", tmp_path).code == 0
    assert comparable(run_dir) == comparable(tiny_run(*EXTRA).run_dir)
