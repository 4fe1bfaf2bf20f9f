"""The test harness: one CPU thread per process, a guard that fails a test which leaves process state
behind, an in-process command-line call (`cli`) and a shared tiny digits run (`tiny_run`).

Markers (registered in pytest.ini): `slow` for process-level and tool-chain tests (real subprocesses,
signals, shell scripts, multi-second tool runs; `python -m pytest -m "not slow"` is the fast lane),
`cuda` for tests that need a GPU (skipped without one).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import pytest
import torch

from tests.fixtures import FGSM_RUN, TINY, ProcessState, read_json, read_metrics, run_dir_of, run_train


def pytest_configure(config: pytest.Config) -> None:
    # The tensors here are tiny: one intra-op thread is several times faster than two on a busy 2-core
    # machine (no OpenMP spinning). Children started by tests (train.py, launch.py's runs) inherit it,
    # so a run resumed in-process continues one killed in a subprocess with the same thread count.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------- the state guard
@pytest.fixture(autouse=True)
def no_leaked_state():
    """Fails the test if it, or an entry point it ran in-process, left process state behind (see
    ProcessState); restores that state either way, so the next test starts clean."""
    before = ProcessState()
    yield
    leaked = before.restore()
    if leaked:
        pytest.fail("the test left process state behind: " + "; ".join(leaked), pytrace=False)


# ------------------------------------------------------------------------------ in-process CLI call
@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()

    @property
    def out_lines(self) -> list[str]:
        return self.out.strip().splitlines()


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli("train.py", *argv) runs that entry point's main(argv) in this process, as `python train.py
    argv` would, and returns its exit code, stdout and stderr (a CliResult). argparse's SystemExit
    (bad flags, --help) becomes the exit code; help text is wrapped at 80 columns, as in a pipe."""
    monkeypatch.setenv("COLUMNS", "80")

    def call(entry: str, *argv) -> CliResult:
        module = importlib.import_module(entry.removesuffix(".py"))
        capsys.readouterr()  # drop what the test printed before
        try:
            code = module.main([str(a) for a in argv])
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits with 1
                print(exc.code, file=sys.stderr)
                code = 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return call


# ----------------------------------------------------------------------------------- tiny digits run
@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run directory; the files are read at each access (a test may not change them)."""
    run_dir: str

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    @property
    def rows(self) -> list[dict]:
        return read_metrics(self.run_dir)

    @property
    def final(self) -> dict:
        return read_json(self.path("final.json"))

    @property
    def config(self) -> dict:
        return read_json(self.path("config.json"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(*flags) trains TINY + flags in-process once per session (keyed by run name) and returns
    the finished Run; tests that only read a run share it. --debug is dropped with debug=False (then
    train.py writes log.txt)."""
    import train
    done: dict[str, Run] = {}

    def run(*flags: str, debug: bool = True) -> Run:
        argv = [a for a in TINY if debug or a != "--debug"] + [str(f) for f in flags]
        name = os.path.basename(run_dir_of("", argv))
        if name not in done:
            out = str(tmp_path_factory.mktemp("tiny_run"))
            assert train.main(argv + ["--out_dir", out]) == 0, argv
            done[name] = Run(os.path.join(out, name))
        return done[name]
    return run


# ------------------------------------------------------------------ a finished run tests copy or read
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
    """A finished tiny digits FGSM run directory (train.py in-process), one per test module."""
    return run_train(tmp_path_factory.mktemp("finished"), *FGSM_RUN)
