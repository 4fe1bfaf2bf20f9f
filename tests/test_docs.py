"""The repo's rules for README.md and docs/*.md: facts about the code, not about how it was made;
links and file names that hold; module attributes that exist; the README's GradAlign code is the code
that runs. Each check is a function of the text, so the tests below also show that it can fail."""
from __future__ import annotations

import glob
import importlib
import inspect
import os
import re

import pytest

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
MODULES = ("analysis", "autoattack_eval", "bench", "config", "data", "eval", "gpu_check", "launch", "methods",
           "models", "precision", "report", "rundir", "sweep_cost", "train", "utils")
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
