"""sh/demo_digits.sh and its recipe files: its commands, and a short real run through launch.py and report.py."""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys

import pytest

import methods
import train

pytestmark = pytest.mark.slow  # runs the shell script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "sh/demo_digits.sh"


def demo(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(["bash", DEMO, *args], cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


DEMO_METHODS = ("fgsm", "fgsm_rs", "gradalign", "pgd10", "nfgsm", "zerograd", "multigrad", "elle", "elle_a")


def test_dry_run_is_the_recipe_plus_each_methods_flags_on_seeds_5_to_9(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name the recipe file from the repository root
    out = demo({"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5 * len(DEMO_METHODS)  # seeds 5-9 (the confirmation seeds) x 9 methods
    configs = [train.parse_config(shlex.split(line)[2:])[0] for line in lines]
    expected = [train.parse_config(["@recipes/digits_demo.args", "--out_dir=runs/demo_digits",
                                    *methods.flags(m, 76.5, "digits"), f"--seed={seed}"])[0]
                for seed in range(5, 10) for m in DEMO_METHODS]
    assert configs == expected
    assert {(c.dataset, c.model, c.n_layers, c.n_filters_cnn, c.clamp_grad, c.eps) for c in configs} == {
        ("digits", "cnn", 1, 8, "half", 76.5)}
    assert len({train.run_name(c, train.parse_config([])[1]) for c in configs}) == 45
    out = demo({"DRY_RUN": "1", "SEEDS": "11 12", "METHODS": "fgsm"})
    assert [train.parse_config(shlex.split(line)[2:])[0].seed for line in out.stdout.splitlines()] == [11, 12]
    bad = demo({"DRY_RUN": "1", "METHODS": "fgsm nope"})
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_the_quick_start_recipe_is_the_demos_gradalign_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    quick = train.parse_config(["@recipes/digits_gradalign.args"])[0]
    demo_run = train.parse_config(["@recipes/digits_demo.args", *methods.flags("gradalign", 76.5, "digits")])[0]
    assert quick == demo_run and quick.grad_align_cos_lambda == 1


def test_short_demo_writes_the_report_tables(tmp_path):
    env = {"SEEDS": "0", "METHODS": "gradalign", "JOBS": "1", "OUT": str(tmp_path / "runs"),
           "REPORT": str(tmp_path / "report"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = demo(env, "--epochs=1", "--n_final_eval=64", "--eval_iter_freq=5", "--n_eval_every_k_iter=128")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["FGSM + GradAlign"]
    assert {(r["model"], r["n_seeds"], r["seeds"]) for r in rows} == {("cnn-1x8", "1", "0")}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "FGSM + GradAlign" in report and "cnn-1x8" in report
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
