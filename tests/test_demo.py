"""sh/demo_digits.sh: its commands, and a short real run through launch.py and report.py."""
from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys

import pytest

import train

pytestmark = pytest.mark.slow  # runs the shell script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "sh/demo_digits.sh"


def demo(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(["bash", DEMO, *args], cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def test_dry_run_holds_the_recipe_and_selects_seeds():
    out = demo({"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5 * 4  # seeds 5-9 (the confirmation seeds) x 4 methods
    configs = [train.parse_config(shlex.split(line)[2:])[0] for line in lines]
    assert {c.seed for c in configs} == {5, 6, 7, 8, 9}
    assert {(c.dataset, c.model, c.clamp_grad) for c in configs} == {("digits", "cnn", "half")}
    assert sorted(c.grad_align_cos_lambda for c in configs).count(0) == 15  # GradAlign only in its runs
    assert len({train.run_name(c, train.parse_config([])[1]) for c in configs}) == 20
    out = demo({"DRY_RUN": "1", "SEEDS": "11 12", "METHODS": "fgsm"})
    assert [train.parse_config(shlex.split(line)[2:])[0].seed for line in out.stdout.splitlines()] == [11, 12]
    bad = demo({"DRY_RUN": "1", "METHODS": "fgsm nope"})
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_short_demo_writes_the_report_tables(tmp_path):
    env = {"EPOCHS": "1", "SEEDS": "0", "METHODS": "gradalign", "JOBS": "1", "OUT": str(tmp_path / "runs"),
           "REPORT": str(tmp_path / "report"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = demo(env, "--n_final_eval=64", "--eval_iter_freq=5", "--n_eval_every_k_iter=128")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["FGSM + GradAlign"]
    assert {(r["model"], r["n_seeds"], r["seeds"]) for r in rows} == {("cnn-1x8", "1", "0")}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "FGSM + GradAlign" in report and "cnn-1x8" in report
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
