"""launch.py: real digits runs end to end (submitit: tests/test_locks_and_cluster.py), failures
reported by run name with train.py's exit code, and the device each command gets."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import launch
import report
import train
from tests.fixtures import ROOT
from tests.fixtures import TINY as TINY_ARGS

TINY = ("--dataset digits --model cnn --n_filters_cnn 4 --epochs 1 --batch_size 350 --n_eval_every_k_iter 350 "
        "--eval_iter_freq 2 --attack_iters 2 --n_final_eval 64 --batch_size_eval 64 --debug --device cpu --eps 76 "
        "--clamp_grad half")


def command(out_dir, *extra: str) -> str:
    return f"python train.py {TINY} --out_dir {shlex.quote(str(out_dir))} {' '.join(extra)}"


def run_name(out_dir, *extra: str) -> str:
    """The run name of command(out_dir, *extra), derived here independently of launch.py."""
    cfg, defaults = train.parse_config(shlex.split(command(out_dir, *extra))[2:])
    return train.run_name(cfg, defaults)


def log_of(tmp_path, run_dir) -> str:
    """The log launch.py keeps of a run directory under tmp_path/logs."""
    return launch.log_file(str(tmp_path / "logs"), str(run_dir), [], 0)


def launch_py(cli, tmp_path, lines: list[str], *args: str):
    """launch.py in this process (its runs are subprocesses, one thread each: see conftest.py)."""
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    return cli("launch.py", commands, "--log_dir", tmp_path / "logs", *args)


@pytest.mark.slow
def test_local_sweep_end_to_end_with_a_failing_command(tmp_path, cli):
    out = tmp_path / "runs"
    good = [command(out, "--seed 0"), command(out, "--seed 1")]
    bad = command(out, "--eps -1")
    done = launch_py(cli, tmp_path, ["# two seeds and a bad eps", *good, "", bad], "--jobs", "2")
    assert done.code == 1, done.out + done.err
    names = [run_name(out, "--seed 0"), run_name(out, "--seed 1")]
    bad_name = names[0].replace("eps76", "eps-1")
    assert f"FAILED {bad_name}: exit 2 (bad input)" in done.out
    assert "3 runs: 2 ok, 1 failed" in done.out
    for name in names:
        assert f"{name}: ok" in done.out
        assert os.path.getsize(log_of(tmp_path, out / name)) > 0
    assert "outside [0, 255]" in open(log_of(tmp_path, out / bad_name)).read()

    runs = report.collect_runs([str(out)])
    assert sorted(r.name for r in runs) == sorted(names) and all(r.final for r in runs)
    (row,) = report.aggregate(runs)
    assert (row["method"], row["n_seeds"], row["seeds"], row["n_eval"]) == ("FGSM-RS", 2, "0 1", 64)
    assert "debug runs" in row["flags"]
    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert os.path.getsize(tmp_path / "report" / "report.csv") > 0

    # Relaunching skips the finished runs (train.py does) and succeeds.
    final = out / names[0] / "final.json"
    before = final.stat().st_mtime_ns
    again = launch_py(cli, tmp_path, good, "--jobs", "2")
    assert again.code == 0 and "2 runs: 2 ok, 0 failed" in again.out
    assert final.stat().st_mtime_ns == before


@pytest.mark.slow
def test_nan_loss_is_reported_as_such(tmp_path, cli):
    out = tmp_path / "runs"
    faulty = command(out).replace("python train.py", "python tests/faulty_train.py --nan_at 1 train.py", 1)
    done = launch_py(cli, tmp_path, [faulty])
    assert done.code == 1
    assert f"FAILED {run_name(out)}: exit 4 (the training loss became NaN or inf)" in done.out


def test_devices_go_round_robin_over_the_gpus(tmp_path):
    commands = launch.read_commands([command(tmp_path, f"--seed {s}").replace(" --device cpu", "") for s in range(3)]
                                    + ["# a comment", "   ", command(tmp_path, "--seed 9")])
    tasks = launch.make_tasks(commands, str(tmp_path), n_gpus=2)
    assert [t.argv[-1] for t in tasks[:3]] == ["--device=cuda:0", "--device=cuda:1", "--device=cuda:0"]
    assert tasks[3].argv[-2:] == ["--seed", "9"]  # it names its device (cpu): left alone
    assert all(t.argv[0] == sys.executable for t in tasks)
    assert tasks[1].name == run_name(tmp_path, "--seed 1")
    assert tasks[1].log_path == launch.log_file(str(tmp_path), str(tmp_path / tasks[1].name), [], 0)
    assert os.path.basename(tasks[1].log_path).startswith(tasks[1].name + ".")
    cpu = launch.make_tasks(commands[:1], str(tmp_path), n_gpus=0)
    assert cpu[0].argv[-1] == "--device=cpu"
    assert launch.make_tasks(commands[:1], str(tmp_path), n_gpus=None)[0].argv[-1] != "--device=cpu"


def test_unparseable_commands_get_a_numbered_name(tmp_path):
    (task,) = launch.make_tasks([["python", "train.py", "--attack", "nope"]], str(tmp_path), n_gpus=0)
    assert task.name == "cmd0000" and task.run_dir is None
    assert launch.describe(-9) == "killed by signal SIGKILL"
    assert launch.describe(3) == "in progress elsewhere (locked)"


# ------------------------------------------------------- relative paths, missing scripts, late stops
def test_relative_paths_mean_what_they_mean_in_the_folder_launch_py_starts_in(tmp_path, cli, monkeypatch, tiny_run):
    finished = tiny_run()
    monkeypatch.chdir(tmp_path)  # not the repository: `train.py` is still the repository's
    (tmp_path / "runs").mkdir()
    shutil.copytree(finished.run_dir, tmp_path / "runs" / os.path.basename(finished.run_dir))
    line = f"python train.py {shlex.join(TINY_ARGS)} --out_dir runs"
    (tmp_path / "cmds.txt").write_text(line + "\n")
    (task,) = launch.make_tasks(launch.read_commands([line]), str(tmp_path / "logs"), None)
    assert task.cwd == str(tmp_path) and task.argv[1] == os.path.join(launch.REPO, "train.py")
    assert task.run_dir == finished.run_dir.replace(os.path.dirname(finished.run_dir), str(tmp_path / "runs"))
    status = cli("launch.py", "cmds.txt", "--status")  # the default --log_dir: runs/logs here
    assert status.code == 0 and status.out_lines[0].startswith("1 runs: 1 finished,")
    assert launch.run_command([sys.executable, "-c", "pass"], task.log_path, task.cwd) == 0
    assert open(task.log_path).readline() == f"$ cd {tmp_path} && {sys.executable} -c pass\n"  # absolute paths


def test_a_missing_script_is_named_before_anything_runs(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cmds.txt").write_text(f"python train.py {shlex.join(TINY_ARGS)}\npython nosuchscript.py --x 1\n")
    proc = cli("launch.py", "cmds.txt")
    assert proc.code == 2
    assert proc.err.strip() == (f"launch.py: error: command 2 runs nosuchscript.py, which is neither in {tmp_path} "
                                f"nor in {launch.REPO}; fix the script's path")
    assert sorted(os.listdir(tmp_path)) == ["cmds.txt"]  # no log folder, no run


def test_a_command_killed_after_its_run_finished_counts_as_finished(tmp_path):
    log = str(tmp_path / "x.log")
    kill = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    assert launch.run_command(kill, log, finished=lambda: True) == 0
    assert open(log).read().splitlines()[-1] == (f"{launch.EXIT_MARK}0 (killed by SIGTERM after its run finished: "
                                                 "final.json is whole)")
    assert launch.last_exit_code(log) == 0
    assert launch.run_command(kill, log, finished=lambda: False) == -signal.SIGTERM  # not finished: stopped
    assert launch.last_exit_code(log) == -signal.SIGTERM


@pytest.mark.slow
def test_sigterm_just_after_both_runs_wrote_final_json_reports_them_finished(tmp_path):
    out = tmp_path / "runs"
    lines = [command(out, f"--seed {s} --epochs 0").replace("python train.py", "python tests/faulty_train.py "
                                                 "--hang_after_final train.py", 1) for s in (0, 1)]
    (tmp_path / "cmds.txt").write_text("\n".join(lines) + "\n")
    sweep = subprocess.Popen([sys.executable, "launch.py", str(tmp_path / "cmds.txt"), "--jobs", "2",
                              "--log_dir", str(tmp_path / "logs")], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    finals = [out / run_name(out, f"--seed {s} --epochs 0") / "final.json" for s in (0, 1)]
    deadline = time.time() + 120
    while not all(f.exists() for f in finals) and time.time() < deadline:
        time.sleep(0.2)
    assert all(f.exists() for f in finals), sweep.communicate(timeout=60)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143
    assert err.strip() == ("launch.py: stopped by SIGTERM; stopped 0 running command(s), 2 finished (their "
                           "final.json was written), 0 not started: relaunch the same commands to resume")
    for s in (0, 1):
        log = launch.log_file(str(tmp_path / "logs"), str(out / run_name(out, f"--seed {s} --epochs 0")), [], 0)
        assert open(log).read().rstrip().endswith(f"{launch.EXIT_MARK}0 (killed by SIGTERM after its run finished: "
                                                  "final.json is whole)")
