"""The repo's rules: it stands on its own (no pointers to notes a clone does not have, no test hooks
in the training code, one method->flags table); README.md and docs/*.md state facts about the code,
with links, file names and module attributes that hold (each check is a function of the text, so
the tests also show that it can fail); the Docker image gets requirements.txt's exact torch and
torchvision pins; and the test harness itself (tests/conftest.py, tests/fixtures.py).
"""
from __future__ import annotations

import ast
import fnmatch
import glob
import importlib
import inspect
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

import config
import lease
import methods
import report
import utils
from tests.fixtures import ProcessState

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
    for name in ("train.py", "utils.py", "precision.py", "rundir.py", "lease.py", "config.py"):
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
    out = cli("sweep.py", "flags", "gradalign", "--eps", "14", "--dataset", "cifar10")
    assert out.code == 0, out.err
    assert out.out.split() == ["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=1.124", "--epochs=30",
                               "--lr_max=0.30"]
    bad = cli("sweep.py", "flags", "pgd3", "--eps", "8", "--dataset", "svhn")
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
    assert re.search(r"^pytest-xdist==\d+\.\d+\.\d+$", pins, re.MULTILINE)  # pytest.ini's -n auto needs it
    assert "-n auto" in open(os.path.join(ROOT, "pytest.ini")).read()
    runtime = open(os.path.join(ROOT, "requirements.txt")).read()
    assert not re.search(r"^pytest\b", runtime, re.MULTILINE)


@pytest.mark.slow
def test_launch_names_a_run_without_importing_the_training_code():
    code = ("import sys, launch; d = launch.run_dir_of(['--dataset', 'digits', '--eps', '8', '--out_dir', 'r']); "
            "print(d, 'train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["r/digits_resnet18_fgsm_random_eps8_lam0_seed0", "False"]


README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAX_README_LINES = 250
# Wording about how the repo came about, which tells a reader nothing about what it does.
PHRASES = ("not met", "when this was written", "shared 2-core machine", "on this project", "the team",
           "this session", "targets set", "no gpu was available", "for lack of cpu time", "as of writing",
           "at the time of writing", "todo")
PHRASE_WORDS = (r"\bissues?\b",)  # whole words only
# Files the tools write, named in the docs as outputs (not files of the repository).
OUTPUT_FILES = {"report.md", "lemma2.md"}
# Pages that also name files of other repositories (the successors' released code): there only the
# paths under this repository's folders are checked.
OTHER_CODE_PAGES = {"later_methods.md"}
FOLDERS = ("docs/", "sh/", "recipes/", "tests/", ".ci/")
MODULES = ("analysis", "authors_compare", "autoattack_eval", "bench", "config", "cost", "data", "eval", "gpu_check",
           "launch",
           "lease", "methods", "models", "numerics", "precision", "report", "rundir", "sweep_cost", "timing",
           "tracking", "train", "utils")
PATH_RE = re.compile(r"@?((?:\.?[\w-]+/)*(?:[\w.-]+\.(?:py|sh|args|md|ini|toml)|requirements[\w-]*\.txt)"
                     r"|(?:docs|sh|recipes|tests|\.ci)/[\w./-]*)")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def markdown_files() -> list[str]:
    return [README, *DOCS]


def code_spans(text: str) -> list[str]:
    """Inline `code` and the lines of fenced code blocks."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    return fenced + inline


def phrases_found(text: str) -> list[str]:
    low = text.lower()
    return [p for p in PHRASES if p in low] + [w for w in PHRASE_WORDS if re.search(w, low)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(text: str, folder: str) -> list[str]:
    """Relative links whose file does not exist, and #anchors with no heading of that name."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(folder, path)) if path else None
        if full and not os.path.exists(full):
            bad.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.*)$", read(full) if full else text, re.MULTILINE)
            if anchor not in {slug(h) for h in headings}:
                bad.append(target)
    return bad


def missing_paths(text: str, folders_only: bool = False) -> list[str]:
    """Repository files named in code spans (*.py, *.sh, *.args, *.md, docs/..., sh/..., recipes/...)
    that do not exist; placeholders (<name>, *, X), URLs and the tools' output files are left alone.
    folders_only: only the paths under this repository's folders."""
    bad = []
    for span in code_spans(text):
        for word in span.split():
            if "://" in word:
                continue
            for found in PATH_RE.findall(word.strip("\"'(),;:")):
                path = found.rstrip(".,;:)")
                if re.search(r"[<>*{}$]|\bX\b|\.\.\.", word) or os.path.basename(path) in OUTPUT_FILES:
                    continue
                if folders_only and not path.startswith(FOLDERS):
                    continue
                if "/" not in path and not path.endswith((".py", ".sh", ".args", ".md", ".txt", ".ini", ".toml")):
                    continue
                if not os.path.exists(os.path.join(ROOT, path)):
                    bad.append(path)
    return bad


def missing_attributes(text: str) -> list[str]:
    """`module.name` references (utils.grad_align_reg, eval.final_evaluation) that the module lacks."""
    bad = []
    pattern = re.compile(rf"\b({'|'.join(MODULES)})\.([A-Za-z_]\w*)")
    for span in code_spans(text):
        for module, name in pattern.findall(span):
            if name in {"py", "json", "jsonl", "pth", "txt", "md", "args"}:
                continue
            if not hasattr(importlib.import_module(module), name):
                bad.append(f"{module}.{name}")
    return bad


def quoted_function_differs(text: str, fn) -> bool:
    """True when the text quotes `def <fn name>` in a python block that is not fn's source."""
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    quoted = [b for b in blocks if b.lstrip().startswith(f"def {fn.__name__}(")]
    return any(b != inspect.getsource(fn) for b in quoted)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_no_wording_about_how_the_repo_was_made(path):
    assert phrases_found(read(path)) == [], path


@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_links_and_named_files_exist(path):
    text = read(path)
    assert broken_links(text, os.path.dirname(path)) == [], path
    assert missing_paths(text, folders_only=os.path.basename(path) in OTHER_CODE_PAGES) == [], path
    assert missing_attributes(text) == [], path


def test_readme_is_short_and_quotes_grad_align_reg_as_it_runs():
    text = read(README)
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "def grad_align_reg(" in text
    assert not quoted_function_differs(text, utils.grad_align_reg)


def test_every_docs_page_is_linked_from_the_readme():
    text = read(README)
    for path in DOCS:
        assert f"](docs/{os.path.basename(path)}" in text, path


def test_the_checks_fail_on_what_they_guard_against(tmp_path):
    assert phrases_found("GradAlign's median: not met (14.1%)") == ["not met"]
    assert phrases_found("See issue 22.") == [r"\bissues?\b"]
    assert phrases_found("the tissue of the model") == []
    assert broken_links("[x](docs/nope.md) [y](#nowhere)\n# Somewhere\n", ROOT) == ["docs/nope.md", "#nowhere"]
    assert broken_links("[x](docs/gpu.md) [y](#somewhere)\n# Somewhere\n", ROOT) == []
    assert missing_paths("run `sh/compare_digits.sh` or `python nope.py`, `train.py`") == [
        "sh/compare_digits.sh", "nope.py"]
    assert missing_paths("`core/utils/train.py`, `sh/nope.sh`", folders_only=True) == ["sh/nope.sh"]
    assert missing_paths("`runs/<run>/final.json`, `recipes/<method>_cifar10_eps8.args`, `report.md`") == []
    assert missing_attributes("`train.final_evaluation`, `eval.final_evaluation`, `utils.py`") == [
        "train.final_evaluation"]
    source = inspect.getsource(utils.grad_align_reg)
    assert not quoted_function_differs(f"```python\n{source}```\n", utils.grad_align_reg)
    assert quoted_function_differs(f"```python\n{source.replace('1.0 - mean_cos', '1 - mean_cos')}```\n",
                                   utils.grad_align_reg)


PINNED = ("torch", "torchvision")


def read_repo_file(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def pins(requirements: str) -> dict[str, str]:
    out = {}
    for line in requirements.splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+).*", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", kept)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def base_images(steps: list[tuple[str, str]]) -> list[str]:
    args = {}
    images = []
    for op, rest in steps:
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
        elif op == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def problems(dockerfile: str, requirements: str) -> list[str]:
    """Why the image would not run requirements.txt's torch/torchvision (empty when it would)."""
    pinned = pins(requirements)
    found = [f"requirements.txt does not pin {p} with ==" for p in PINNED if p not in pinned]
    if found:
        return found
    steps = instructions(dockerfile)
    for image in base_images(steps):
        name, _, tag = image.partition(":")
        if "pytorch" in name.lower() and not tag.startswith(pinned["torch"] + "-") and tag != pinned["torch"]:
            found.append(f"base image {image} names another torch than the pinned {pinned['torch']}")
    runs = [rest for op, rest in steps if op == "RUN"]
    if not any(re.search(r"pip\d*\s+install\b.*\s-r\s+(\./)?requirements\.txt\b", r) for r in runs):
        found.append("no RUN installs requirements.txt as it is (pip install -r requirements.txt)")
    for r in runs:
        if "requirements.txt" in r and re.search(r"\b(grep|sed|awk|cut|head|tail)\b", r):
            found.append(f"a RUN filters requirements.txt: {r.strip()}")
        for pkg, version in re.findall(r"\b(torch|torchvision)\s*==\s*([^\s\"']+)", r):
            if version != pinned[pkg]:
                found.append(f"a RUN installs {pkg}=={version}, not the pinned {pinned[pkg]}")
    return found


def test_dockerfile_installs_the_pinned_torch_and_torchvision():
    assert problems(read_repo_file("Dockerfile"), read_repo_file("requirements.txt")) == []


REQS = "torch==2.14.1\ntorchvision==0.29.1\nnumpy\n"
GOOD = "FROM python:3.11-slim\nCOPY requirements.txt .\nRUN pip install --no-cache-dir -r requirements.txt\n"


@pytest.mark.parametrize("dockerfile, requirements, fragment", [
    # the image this repo shipped before: a torch 2.9.0 base and the pins filtered out
    (("ARG BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime\nFROM ${BASE}\nCOPY requirements.txt .\n"
      "RUN grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/req.txt && pip install -r /tmp/req.txt\n"),
     REQS, "another torch"),
    (("FROM pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime\nRUN grep -vE '^torch' requirements.txt \\\n"
      "    > /tmp/r.txt && pip install -r /tmp/r.txt\n"), REQS, "filters"),
    ("FROM python:3.11-slim\nRUN pip install numpy\n", REQS, "as it is"),
    (GOOD + "RUN pip install torch==2.13.0\n", REQS, "torch==2.13.0"),
    (GOOD, "torch\ntorchvision==0.29.1\n", "does not pin torch"),
])
def test_the_check_catches_an_image_with_another_torch(dockerfile, requirements, fragment):
    found = problems(dockerfile, requirements)
    assert any(fragment in p for p in found), found
    assert problems(GOOD, REQS) == []


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return {name.strip(): value.strip().strip('"') for op, rest in steps if op == "ARG" and "=" in rest
            for name, value in [rest.split("=", 1)]}


def test_every_requirement_is_pinned_exactly():
    lines = [line.strip() for line in read_repo_file("requirements.txt").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", line) for line in lines), lines


def test_the_base_image_is_an_exact_tag_of_the_tests_python():
    (image,) = base_images(instructions(read_repo_file("Dockerfile")))
    name, _, tag = image.partition(":")
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-slim-[a-z]+", tag)
    assert name == "python" and m, f"{image}: pin an exact Python release (python:X.Y.Z-slim-<debian>)"
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]


def test_the_default_torch_build_is_the_pinned_wheels_and_the_build_checks_it():
    steps = instructions(read_repo_file("Dockerfile"))
    flavour = build_args(steps)["TORCH_CUDA"]
    install = next(rest for op, rest in steps if op == "RUN" and "requirements.txt" in rest)
    assert 'download.pytorch.org/whl/${TORCH_CUDA}' in install and "torch.version.cuda" in install
    if torch.__version__.split("+")[0] == pins(read_repo_file("requirements.txt"))["torch"] and torch.version.cuda:
        assert flavour == "cu" + torch.version.cuda.replace(".", "")  # the wheel these tests ran on
    docs = read_repo_file(os.path.join("docs", "gpu.md"))
    for needed in (flavour, "cu128", "cu126", ">= 580", ">= 525"):
        assert needed in docs, needed


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore pattern (the subset used here: globs, a trailing /, a **/ prefix) drops path."""
    parts = path.split("/")
    for raw in patterns:
        pattern = raw.rstrip("/").removeprefix("**/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.split("/")[-1], pattern) for p in prefixes):
            return True
    return False


def test_dockerignore_keeps_results_and_caches_out_and_every_tracked_file_in():
    patterns = [line.strip() for line in read_repo_file(".dockerignore").splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/config", "runs/x/model.pth", "data/cifar-10-batches-py/data_batch_1", "reports/a/report.csv",
                 "model.pth", "gpu_check.json", "tests/__pycache__/a.pyc", ".pytest_cache/v", ".ruff_cache/x"):
        assert ignored(path, patterns), path
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    needed = [p for p in tracked if not p.startswith(".") or p.startswith(".ci/")]
    assert [p for p in needed if ignored(p, patterns)] == []


def test_the_guard_names_and_restores_each_kind_of_leaked_state(tmp_path, monkeypatch):
    handler, threads, cwd = signal.getsignal(signal.SIGUSR2), torch.get_num_threads(), os.getcwd()
    before = ProcessState()
    signal.signal(signal.SIGUSR2, lambda *_: None)
    torch.set_num_threads(threads + 1)
    os.chdir(tmp_path)
    os.environ["FASTLANE_HARNESS_CHECK"] = "1"
    old_umask = os.umask(0o077)
    lock = lease.RunLock(str(tmp_path))
    lock.acquire()  # its refreshing thread keeps running: not released
    try:
        leaked = before.restore()
    finally:
        lock.release()
    assert [text.split(" (")[0] for text in leaked] == [
        "the SIGUSR2 handler", "torch's thread count", "the working directory",
        "environment variables ['FASTLANE_HARNESS_CHECK']", "the umask", "a run lock's refreshing thread"]
    assert signal.getsignal(signal.SIGUSR2) is handler and torch.get_num_threads() == threads
    assert os.getcwd() == cwd and "FASTLANE_HARNESS_CHECK" not in os.environ
    assert os.umask(old_umask) == old_umask  # restored to what it was before
    os.umask(old_umask)
    assert ProcessState().restore() == []  # nothing changed: nothing named
    assert not [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]


def test_cli_reports_exit_codes_and_streams_as_a_subprocess_would(cli):
    usage = cli("train.py", "--epochs", "x")  # argparse: SystemExit(2), message on stderr
    assert usage.code == 2 and "--epochs" in usage.err and usage.out == ""
    helped = cli("eval.py", "--help")  # argparse: SystemExit(0), help on stdout
    assert helped.code == 0 and helped.out.startswith("usage: ") and helped.err == ""
    listed = cli("sweep.py", "flags", "fgsm", "--eps", "8", "--dataset", "cifar10")  # main's return value
    assert listed.code == 0 and "--attack=fgsm" in listed.out


def test_tiny_run_trains_once_per_setting(tiny_run):
    first = tiny_run("--attack", "fgsm", "--attack_init", "zero")
    mtime = os.path.getmtime(first.path("final.json"))
    again = tiny_run("--attack_init", "zero", "--attack", "fgsm")  # the same run, flags in another order
    assert again == first and os.path.getmtime(again.path("final.json")) == mtime
    assert [r["iteration"] for r in first.rows] == [0, 2, 4]
    assert first.final["n_eval"] == 64 and first.config["attack"] == "fgsm"
    assert tiny_run("--attack", "fgsm", "--attack_init", "zero", "--seed", "1") != first
