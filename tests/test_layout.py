"""The repo stands on its own: no pointers to notes a clone does not have, no test hooks in the
training code, one method->flags table."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

import config
import methods
import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The word SPEC followed by a section sign or a section number: a section of a document not in the repo.
SPEC_POINTER = re.compile(r"SPEC\s*(§|\d)")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_points_at_spec_sections():
    offenders = []
    for path in tracked_files():
        try:
            text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        offenders += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}" for m in SPEC_POINTER.finditer(text)]
    assert not offenders, offenders


def test_the_spec_pattern_catches_pointers():  # the examples are built from pieces: this file must not match
    assert SPEC_POINTER.search("see " + "SPEC" + " §3.1 item 6") and SPEC_POINTER.search("SPEC" + " 3.0")
    assert not SPEC_POINTER.search("the specification of the flags")


def environment_names(source: str) -> list[str]:
    """The names read through os.environ[...], os.environ.get(...) and os.getenv(...), and every
    string constant that names something with TEST (a name built elsewhere still shows up)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            names.append(ast.unparse(node.slice))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("environ.get", "getenv")) and node.args:
            names.append(ast.unparse(node.args[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "TEST" in node.value:
            names.append(node.value)
    return names


def test_training_code_reads_no_test_environment_variable():
    for name in ("train.py", "utils.py", "rundir.py", "config.py"):
        with open(os.path.join(ROOT, name)) as f:
            names = environment_names(f.read())
        assert not [n for n in names if "TEST" in n.upper()], (name, names)


def test_the_environment_check_sees_a_test_hook():
    hook = 'import os\nkill_at = int(os.environ.get("GRADALIGN_" + "TEST_KILL_AT", "-1"))\n'
    assert any("TEST" in n for n in environment_names(hook))
    assert any("TEST" in n for n in environment_names('import os\nx = os.environ["MY_TEST"]\n'))


@pytest.mark.parametrize("dataset", ["cifar10", "svhn", "digits"])
def test_report_names_each_recipe_by_the_label_of_its_registry_entry(dataset):
    for key in methods.recipes():
        flags = methods.flags(key, 8, dataset)
        settings = config.record(config.config_and_defaults(config.build_parser().parse_args(flags))[0])
        label = report.method_name(settings)
        assert label in report.METHOD_ORDER, (key, label)
        perturbation, regulariser = methods.select(config.from_record(settings))
        assert key in (regulariser or perturbation).recipes or key.startswith(perturbation.name), key


def test_method_table_cli_prints_the_sweep_flags(cli):
    out = cli("methods.py", "flags", "gradalign", "--eps", "14", "--dataset", "cifar10")
    assert out.code == 0, out.err
    assert out.out.split() == ["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=1.124", "--epochs=30",
                               "--lr_max=0.30"]
    bad = cli("methods.py", "flags", "pgd3", "--eps", "8", "--dataset", "svhn")
    assert bad.code == 2 and "unknown method 'pgd3'" in bad.err


def test_ci_runs_the_readme_lint_and_test_command_with_a_pinned_ruff():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert ci in readme.splitlines()
    assert "-r requirements-dev.txt" in ci and "ruff check ." in ci and "python -m pytest -q tests" in ci
    assert "--durations=15" in ci  # the full suite, with its slowest tests named
    pins = open(os.path.join(ROOT, "requirements-dev.txt")).read()
    assert re.search(r"^ruff==\d+\.\d+\.\d+$", pins, re.MULTILINE)
    assert re.search(r"^pytest==\d+\.\d+\.\d+$", pins, re.MULTILINE)  # a development tool, not a run dependency
    runtime = open(os.path.join(ROOT, "requirements.txt")).read()
    assert not re.search(r"^pytest\b", runtime, re.MULTILINE)


@pytest.mark.slow
def test_launch_names_a_run_without_importing_the_training_code():
    code = ("import sys, launch; d = launch.run_dir_of(['--dataset', 'digits', '--eps', '8', '--out_dir', 'r']); "
            "print(d, 'train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["r/digits_resnet18_fgsm_random_eps8_lam0_seed0", "False"]
