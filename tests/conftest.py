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
import signal
import sys
import threading

import pytest
import torch

from tests.fixtures import TINY, read_json, read_metrics, run_dir_of

GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
# Set by pytest for each test phase, and by scikit-learn when it is first imported: not a test's doing.
UNGUARDED_ENV = {"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}


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
def _torch_flags() -> tuple:
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)


def _set_torch_flags(flags: tuple) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


@pytest.fixture(autouse=True)
def no_leaked_state():
    """Fails the test if it (or an entry point it ran in-process) changed the signal handlers, the torch
    thread count, the working directory, the environment or the umask, or left a run lock's refreshing
    thread running; restores them either way so the next test starts clean. The TF32 and cudnn
    benchmark switches are process-wide settings train.py makes on purpose: restored, not reported."""
    handlers = {s: signal.getsignal(s) for s in GUARDED_SIGNALS}
    threads, cwd, env, flags = torch.get_num_threads(), os.getcwd(), dict(os.environ), _torch_flags()
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    leaked = []
    for s, handler in handlers.items():
        if signal.getsignal(s) is not handler:
            leaked.append(f"the {s.name} handler")
            signal.signal(s, handler)
    if torch.get_num_threads() != threads:
        leaked.append(f"torch's thread count ({torch.get_num_threads()}, was {threads})")
        torch.set_num_threads(threads)
    if os.getcwd() != cwd:
        leaked.append(f"the working directory ({os.getcwd()})")
        os.chdir(cwd)
    changed = sorted(k for k in (set(env) | set(os.environ)) - UNGUARDED_ENV if env.get(k) != os.environ.get(k))
    if changed:
        leaked.append(f"environment variables {changed}")
        for key in changed:
            if key in env:
                os.environ[key] = env[key]
            else:
                del os.environ[key]
    now = os.umask(umask)
    if now != umask:
        leaked.append(f"the umask ({oct(now)}, was {oct(umask)})")
    _set_torch_flags(flags)
    for thread in threading.enumerate():
        if thread.name == "run-lock-heartbeat":
            thread.join(timeout=2)
            if thread.is_alive():
                leaked.append("a run lock's refreshing thread")
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
