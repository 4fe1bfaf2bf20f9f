"""Runs survive SIGKILL, concurrent launches, corrupt checkpoints and NaN losses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import rundir
import train
from tests.faulty_train import injected
from tests.fixtures import ROOT, RUN, TINY, comparable, run_dir_of


def launch(out_dir, *extra: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """train.py in a subprocess; fault: ("--kill_at", N) or ("--nan_at", N) runs it through
    tests/faulty_train.py, which injects that fault at global iteration N."""
    script = [os.path.join("tests", "faulty_train.py"), *fault, "train.py"] if fault else ["train.py"]
    return subprocess.run([sys.executable, *script, *RUN, "--out_dir", str(out_dir), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_on_another_node_gives_the_uninterrupted_result(tmp_path, tiny_run, cli):
    whole = tiny_run(*RUN[len(TINY):])
    killed = launch(tmp_path / "cut", fault=("--kill_at", "7"))  # mid epoch 2
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
    os.utime(os.path.join(run_dir, ".lock"), (time.time() - rundir.LEASE_SECONDS - 60,) * 2)
    resumed = cli("train.py", *RUN, "--out_dir", tmp_path / "cut")  # in-process: one thread, as the killed run
    assert resumed.code == 0, resumed.err
    assert "resuming" in resumed.out
    assert comparable(run_dir) == comparable(whole.run_dir)
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-") or n == ".lock"]


def test_nan_loss_stops_with_exit_4_and_keeps_the_last_good_state(tmp_path, cli, monkeypatch):
    injected(monkeypatch, nan_at=6)
    proc = cli("train.py", *RUN, "--out_dir", tmp_path)
    assert proc.code == 4
    assert "iteration 6" in proc.err and len(proc.err_lines) == 1
    run_dir = run_dir_of(tmp_path, RUN)
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    state = torch.load(os.path.join(run_dir, train.RESUME_FILE), weights_only=False)
    assert state["next_epoch"] == 2 and state["iteration"] == 5  # after epoch 1 (iterations 1-4); epoch 2 saw it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_absurd_learning_rate_is_caught_as_nonfinite(tmp_path, cli):
    proc = cli("train.py", *RUN, "--out_dir", tmp_path, "--lr_max", "1e38")
    assert proc.code == 4, proc.err
    assert "NaN or inf" in proc.err


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
        before = sorted(os.listdir(os.path.dirname(lock)))
        second = cli("train.py", *args)  # the same command, in this process
        assert first.poll() is None  # the first was still training the whole time
    finally:
        first.kill()
        first.wait()
    assert second.code == 3, second.err
    assert "in progress" in second.err and f"pid {first.pid}" in second.err
    assert len(second.err_lines) == 1
    assert set(before) <= set(os.listdir(os.path.dirname(lock)))  # nothing of the first run removed


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b'{"last": 1}', "truncated"])
def test_bad_checkpoints_give_one_line_exit_2(tmp_path, cli, content):
    path = tmp_path / "model.pth"
    if content == "truncated":
        import models
        torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--model_path", path,
               "--device", "cpu")
    assert proc.code == 2
    assert len(proc.err_lines) == 1 and "Traceback" not in proc.err, proc.err


def test_a_checkpoint_of_another_architecture_names_the_difference(tmp_path, cli):
    import models
    path = tmp_path / "model.pth"
    torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 8).state_dict()}, path)
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--model_path", path,
               "--device", "cpu")
    assert proc.code == 2
    assert "_model.0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)" in proc.err
    assert len(proc.err_lines) == 1


def test_eval_rejects_restarts_without_random_start(cli):
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--model_path", "x", "--attack_init", "zero",
               "--n_restarts", "10")
    assert proc.code == 2 and "random start" in proc.err and len(proc.err_lines) == 1


def test_run_lock_is_exclusive_and_released(tmp_path):
    first, second = rundir.RunLock(str(tmp_path)), rundir.RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(rundir.RunLocked, match=str(os.getpid())):
        second.acquire()
    assert os.listdir(tmp_path) == [".lock"]  # no temporary file left behind
    first.release()
    second.acquire()
    second.release()
    assert os.listdir(tmp_path) == []
