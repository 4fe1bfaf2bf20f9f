"""The test harness itself (tests/conftest.py, tests/fixtures.py): the state guard names what a test
left behind, the in-process CLI call reports argparse's exits as a subprocess would, and the shared
tiny run is trained once."""
from __future__ import annotations

import os
import signal
import threading

import torch

import rundir
from tests.fixtures import ProcessState


def test_the_guard_names_and_restores_each_kind_of_leaked_state(tmp_path, monkeypatch):
    handler, threads, cwd = signal.getsignal(signal.SIGUSR2), torch.get_num_threads(), os.getcwd()
    before = ProcessState()
    signal.signal(signal.SIGUSR2, lambda *_: None)
    torch.set_num_threads(threads + 1)
    os.chdir(tmp_path)
    os.environ["FASTLANE_HARNESS_CHECK"] = "1"
    old_umask = os.umask(0o077)
    lock = rundir.RunLock(str(tmp_path))
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
    listed = cli("methods.py", "flags", "fgsm", "--eps", "8", "--dataset", "cifar10")  # main's return value
    assert listed.code == 0 and "--attack=fgsm" in listed.out


def test_tiny_run_trains_once_per_setting(tiny_run):
    first = tiny_run("--attack", "fgsm", "--attack_init", "zero")
    mtime = os.path.getmtime(first.path("final.json"))
    again = tiny_run("--attack_init", "zero", "--attack", "fgsm")  # the same run, flags in another order
    assert again == first and os.path.getmtime(again.path("final.json")) == mtime
    assert [r["iteration"] for r in first.rows] == [0, 2, 4]
    assert first.final["n_eval"] == 64 and first.config["attack"] == "fgsm"
    assert tiny_run("--attack", "fgsm", "--attack_init", "zero", "--seed", "1") != first
