"""The Docker image gets requirements.txt's torch and torchvision pins (read from both files; no Docker
needed). The box-clamp rule and the rest of the suite were checked on those pins, not on whatever
torch a base image brings. Also: every requirement is pinned, the base image is an exact tag of the
tests' Python, the default CUDA build of torch is the pinned wheel's, and .dockerignore keeps history,
results, data, weights and caches out without dropping a file the image needs."""
from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = ("torch", "torchvision")


def read(name: str) -> str:
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
    assert problems(read("Dockerfile"), read("requirements.txt")) == []


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
    lines = [line.strip() for line in read("requirements.txt").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", line) for line in lines), lines


def test_the_base_image_is_an_exact_tag_of_the_tests_python():
    (image,) = base_images(instructions(read("Dockerfile")))
    name, _, tag = image.partition(":")
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-slim-[a-z]+", tag)
    assert name == "python" and m, f"{image}: pin an exact Python release (python:X.Y.Z-slim-<debian>)"
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]


def test_the_default_torch_build_is_the_pinned_wheels_and_the_build_checks_it():
    steps = instructions(read("Dockerfile"))
    flavour = build_args(steps)["TORCH_CUDA"]
    install = next(rest for op, rest in steps if op == "RUN" and "requirements.txt" in rest)
    assert 'download.pytorch.org/whl/${TORCH_CUDA}' in install and "torch.version.cuda" in install
    if torch.__version__.split("+")[0] == pins(read("requirements.txt"))["torch"] and torch.version.cuda:
        assert flavour == "cu" + torch.version.cuda.replace(".", "")  # the wheel these tests ran on
    docs = read(os.path.join("docs", "gpu.md"))
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
    patterns = [line.strip() for line in read(".dockerignore").splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/config", "runs/x/model.pth", "data/cifar-10-batches-py/data_batch_1", "reports/a/report.csv",
                 "model.pth", "gpu_check.json", "tests/__pycache__/a.pyc", ".pytest_cache/v", ".ruff_cache/x"):
        assert ignored(path, patterns), path
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    needed = [p for p in tracked if not p.startswith(".") or p.startswith(".ci/")]
    assert [p for p in needed if ignored(p, patterns)] == []
