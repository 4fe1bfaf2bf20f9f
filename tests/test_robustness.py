"""Runs survive SIGKILL, concurrent launches, corrupt checkpoints and NaN losses (issue 'lose nothing')."""
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
from tests.test_train import ROOT, TINY

# 4 iterations per epoch; 3 epochs -> global iterations 0..12, resumable states after epochs 0, 1, 2.
RUN = TINY + ["--attack", "fgsm", "--grad_align_cos_lambda", "0.5", "--epochs", "3"]


def launch(out_dir, *extra: str, fault: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """train.py in a subprocess; fault: ("--kill_at", N) or ("--nan_at", N) runs it through
    tests/faulty_train.py, which injects that fault at global iteration N."""
    script = [os.path.join("tests", "faulty_train.py"), *fault, "train.py"] if fault else ["train.py"]
    return subprocess.run([sys.executable, *script, *RUN, "--out_dir", str(out_dir), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def run_dir_of(out_dir, *extra: str) -> str:
    cfg, defaults = train.parse_config(RUN + ["--out_dir", str(out_dir), *extra])
    return os.path.join(str(out_dir), train.run_name(cfg, defaults))


def comparable(run_dir: str):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for row in rows:
        row.pop("elapsed_s"), row.pop("train_minutes")
    final = json.load(open(os.path.join(run_dir, "final.json")))
    final.pop("train_minutes")
    return rows, final


def test_sigkill_mid_epoch_then_rerun_on_another_node_gives_the_uninterrupted_result(tmp_path):
    assert launch(tmp_path / "whole").returncode == 0
    killed = launch(tmp_path / "cut", fault=("--kill_at", "7"))  # mid epoch 2
    assert killed.returncode == -9
    run_dir = run_dir_of(tmp_path / "cut")
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    assert torch.load(os.path.join(run_dir, train.RESUME_FILE), weights_only=False)["next_epoch"] == 2
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "iterat')  # a torn last line, as a crash mid-write would leave
    # The killed run's lock stays behind; as if it had run on another node, silent for longer than the lease:
    stale = {"host": "node-a17", "pid": 4242, "since": "2026-01-01T00:00:00Z", "pid_ns": None}
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        json.dump(stale, f)
    os.utime(os.path.join(run_dir, ".lock"), (time.time() - rundir.LEASE_SECONDS - 60,) * 2)
    resumed = launch(tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert comparable(run_dir) == comparable(run_dir_of(tmp_path / "whole"))
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-") or n == ".lock"]


def test_nan_loss_stops_with_exit_4_and_keeps_the_last_good_state(tmp_path):
    proc = launch(tmp_path, fault=("--nan_at", "6"))
    assert proc.returncode == 4
    assert "iteration 6" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run_dir = run_dir_of(tmp_path)
    assert not os.path.exists(os.path.join(run_dir, "final.json"))
    state = torch.load(os.path.join(run_dir, train.RESUME_FILE), weights_only=False)
    assert state["next_epoch"] == 2 and state["iteration"] == 5  # after epoch 1 (iterations 1-4); epoch 2 saw it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_absurd_learning_rate_is_caught_as_nonfinite(tmp_path):
    proc = launch(tmp_path, "--lr_max", "1e38")
    assert proc.returncode == 4, proc.stderr
    assert "NaN or inf" in proc.stderr


def test_a_live_lock_refuses_a_second_launch_with_exit_3(tmp_path):
    run_dir = run_dir_of(tmp_path)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")  # this test process: alive
    proc = launch(tmp_path)
    assert proc.returncode == 3
    assert str(os.getpid()) in proc.stderr and "in progress" in proc.stderr
    assert sorted(os.listdir(run_dir)) == [".lock"]


def test_a_dead_processs_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = run_dir_of(tmp_path)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        f.write(f"{socket.gethostname()} {int(dead.stdout)}")
    assert launch(tmp_path).returncode == 0
    assert os.path.exists(os.path.join(run_dir, "final.json"))


def test_a_second_launch_during_a_run_exits_3_and_touches_nothing(tmp_path):
    args = [sys.executable, "train.py", *RUN, "--epochs", "200", "--out_dir", str(tmp_path)]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(run_dir_of(tmp_path, "--epochs", "200"), ".lock")
        deadline = time.time() + 120
        while not os.path.exists(lock) and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and os.path.exists(lock)
        before = sorted(os.listdir(os.path.dirname(lock)))
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first was still training the whole time
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 3, second.stderr
    assert "in progress" in second.stderr and f"pid {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert set(before) <= set(os.listdir(os.path.dirname(lock)))  # nothing of the first run removed


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b'{"last": 1}', "truncated"])
def test_bad_checkpoints_give_one_line_exit_2(tmp_path, content):
    path = tmp_path / "model.pth"
    if content == "truncated":
        import models
        torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn",
                           "4", "--model_path", str(path), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_checkpoint_of_another_architecture_names_the_difference(tmp_path):
    import models
    path = tmp_path / "model.pth"
    torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 8).state_dict()}, path)
    proc = subprocess.run([sys.executable, "eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn",
                           "4", "--model_path", str(path), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "_model.0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_eval_rejects_restarts_without_random_start(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "--dataset", "digits", "--model", "cnn", "--model_path", "x",
                           "--attack_init", "zero", "--n_restarts", "10"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "random start" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


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
