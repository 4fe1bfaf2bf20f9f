"""Damaged, foreign or impossible input to eval.py, report.py and launch.py: one line naming the problem
and the fix, exit status 2, nothing written or lost; damaged runs are named, never dropped silently."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eval as eval_py
import launch
import report
import rundir
from tests.fixtures import ROOT, TINY, run_train

RUN = ["--attack", "fgsm"]  # TINY (eps 76) with FGSM: the finished run most tests copy


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
    """A finished tiny digits run directory (train.py in-process)."""
    return run_train(tmp_path_factory.mktemp("finished"), *RUN)


def copy_run(run_dir: str, root, name: str | None = None) -> str:
    """A copy of run_dir under root (as root/<name>, the run's own name by default)."""
    target = os.path.join(str(root), name or os.path.basename(run_dir))
    shutil.copytree(run_dir, target)
    return target


def snapshot(folder) -> dict[str, bytes]:
    """Every file under folder and its bytes: compared before and after to show nothing was written or lost."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def one_line(text: str) -> str:
    """The text's only line (fails if it has more, e.g. a traceback)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        content = json.load(f)
    with open(path, "w") as f:
        json.dump({**content, **changes}, f)


# --------------------------------------------------------------------------------------------- eval.py
EVAL_FAST = ["--n_eval", "8", "--attack_iters", "1", "--n_restarts", "1", "--device", "cpu"]


def eval_main(capsys, *flags: str) -> tuple[int, str, str]:
    """eval.main's exit code, stdout and stderr."""
    capsys.readouterr()
    code = eval_py.main([*flags, *EVAL_FAST])
    out, err = capsys.readouterr()
    return code, out, err


def checkpoint_beside_config(finished: str, folder, weights) -> str:
    """folder/model.pth holding `weights`, beside a copy of the run's config.json."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(finished, "config.json"), folder)
    path = os.path.join(str(folder), "model.pth")
    torch.save(weights, path)
    return path


def test_5_eval_refuses_nonfinite_weights(finished, tmp_path, capsys):
    state = torch.load(os.path.join(finished, "model.pth"), weights_only=True)
    state["last"]["_model.0.weight"][0, 0, 0, 0] = float("nan")
    path = checkpoint_beside_config(finished, tmp_path / "nan", state)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert "NaN or inf" in line and "_model.0.weight" in line and "'last'" in line and "retrain" in line
    assert snapshot(tmp_path) == before


def test_6_eval_early_stopped_model_on_a_bare_state_dict_names_the_fix(finished, tmp_path, capsys):
    last = torch.load(os.path.join(finished, "model.pth"), weights_only=True)["last"]
    path = checkpoint_beside_config(finished, tmp_path / "bare", last)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path, "--early_stopped_model")
    assert code == 2 and out == ""
    assert "bare state_dict" in one_line(err) and "without --early_stopped_model" in err
    assert snapshot(tmp_path) == before
    assert eval_main(capsys, "--model_path", path)[0] == 0  # its one set of weights, as 'last'


def test_7_eval_takes_eps_from_the_run_and_says_which_eps_and_weights(finished, tmp_path, capsys):
    model = os.path.join(finished, "model.pth")
    code, out, err = eval_main(capsys, "--model_path", model)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (result["eps"], result["eps_from"], result["weights"]) == (76, "config.json", "last")
    assert f"eps 76 (from config.json), 'last' weights of {model}" in one_line(err)
    code, out, err = eval_main(capsys, "--model_path", model, "--eps", "8", "--early_stopped_model")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (result["eps"], result["eps_from"], result["weights"]) == (8, "--eps", "best")
    assert "eps 8 (from --eps), 'best' weights" in one_line(err)
    authors = tmp_path / "authors" / "model.pth"  # no config.json beside it: train.py's default eps
    authors.parent.mkdir()
    shutil.copy(model, authors)
    code, out, err = eval_main(capsys, "--model_path", str(authors), "--dataset", "digits", "--model", "cnn",
                               "--n_filters_cnn", "4")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["eps_from"] == "default"
    assert "eps 8 (from default)" in err


@pytest.mark.parametrize("config", [{"dataset": "imagenet"}, {"model": "vit"}, {"n_filters_cnn": "four"},
                                    {"eps": 1000}, "[1, 2]", '{"dataset": "dig'])
def test_19_eval_with_a_foreign_config_json_beside_the_checkpoint(finished, tmp_path, capsys, config):
    folder = tmp_path / "foreign"
    path = checkpoint_beside_config(finished, folder, torch.load(os.path.join(finished, "model.pth"),
                                                                 weights_only=True))
    if isinstance(config, dict):
        edit_json(str(folder / "config.json"), **config)
    else:
        (folder / "config.json").write_text(config)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert str(folder / "config.json") in line and "explicitly" in line
    if isinstance(config, dict):
        (name, value), = config.items()
        assert f"its {name} {value!r}" in line and f"--{name}" in line
    assert snapshot(tmp_path) == before


def test_23_eval_on_a_resume_pt_says_what_it_is_without_torch_advice(finished, tmp_path, capsys):
    path = tmp_path / "resume.pt"  # as train.py's: weights plus Python objects (numpy's RNG state)
    torch.save({"model": torch.load(os.path.join(finished, "model.pth"), weights_only=True)["last"],
                "rng": {"numpy": np.random.get_state()}}, path)
    code, out, err = eval_main(capsys, "--model_path", str(path), "--dataset", "digits", "--model", "cnn")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "resume.pt" in line and "model.pth" in line
    assert "\x1b" not in line and "trust" not in line and "weights_only" not in line


def test_23_ctrl_c_in_eval_is_one_line(finished, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_py, "evaluate", interrupted)
    code, out, err = eval_main(capsys, "--model_path", os.path.join(finished, "model.pth"))
    assert code == rundir.EXIT_INTERRUPTED == 130 and out == ""
    assert one_line(err).startswith("eval.py: interrupted (Ctrl-C)")


# ------------------------------------------------------------------------------------------- report.py
def report_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = report.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


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


def test_11_report_on_a_missing_root_or_curves_dir_writes_nothing(finished, tmp_path, capsys):
    out_dir = tmp_path / "out"
    for args, expected in (([str(tmp_path / "nope")], f"root {tmp_path / 'nope'} does not exist; check the path"),
                           (["--curves", str(tmp_path / "nope")], "no such run directory"),
                           (["--curves", str(tmp_path)], "it has no metrics.jsonl"),
                           ([finished, "--curves", finished, str(tmp_path / "nope")], "no such run directory")):
        code, out, err = report_main(capsys, *args, "--out", str(out_dir))
        assert code == 2 and out == ""
        assert one_line(err).startswith("report.py: error: ") and expected in err
        assert not out_dir.exists()


def test_17_report_out_pointing_at_a_file(finished, tmp_path, capsys):
    target = tmp_path / "report.md"
    target.write_text("keep me")
    code, out, err = report_main(capsys, os.path.dirname(finished), "--out", str(target))
    assert code == 2 and out == ""
    assert one_line(err) == f"report.py: error: --out {target} is a file, not a folder; give a folder"
    assert target.read_text() == "keep me"


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
    return shlex.join(["python", "train.py", *TINY, *RUN, "--out_dir", str(out_dir), *extra])


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


@pytest.mark.parametrize("case", ["quote", "no file", "log_dir is a file", "long name"])
def test_18_launch_refuses_bad_input_before_running_anything(tmp_path, capsys, monkeypatch, case):
    out_dir = tmp_path / "runs"
    lines = [train_command(out_dir, "--seed", "0"), train_command(out_dir, "--seed", "1")]
    args = []
    if case == "quote":
        lines.append('python train.py --out_dir "runs')
        expected = "launch.py: error: line 3 of the commands: no closing quotation"
    elif case == "no file":
        args = [str(tmp_path / "missing.txt")]
        expected = f"launch.py: error: cannot read the commands file {tmp_path / 'missing.txt'} (No such file"
    elif case == "log_dir is a file":
        (tmp_path / "logs").write_text("keep me")
        expected = f"launch.py: error: --log_dir {tmp_path / 'logs'} is a file, not a folder; give a folder"
    else:
        real = launch.run_dir_of
        monkeypatch.setattr(launch, "run_dir_of", lambda a: real(a) + ("x" * 300 if a[-2:] == ["--seed", "1"] else ""))
        expected = "launch.py: error: command 2 names its run with 4"
    before = snapshot(tmp_path)
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = launch.main([*(args or [str(commands)]), "--log_dir", str(tmp_path / "logs")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_line(err).startswith(expected)
    assert snapshot(tmp_path) == {**before, "commands.txt": commands.read_bytes()}  # no run, no log written
    assert not out_dir.exists()


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
        children = [rundir.read_lock(p)[0].pid for p in locks]
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
