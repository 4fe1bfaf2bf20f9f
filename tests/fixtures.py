"""Shared test helpers: the tiny digits run's flags, reading a run directory, and writers of tiny
datasets in the real on-disk formats (CIFAR-10 and CIFAR-100 pickles, SVHN .mat, MNIST IDX)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import threading

import numpy as np

import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny digits run: cnn-4, 1400/350 = 4 iterations per epoch, evaluated every 2 iterations.
TINY = ["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76", "--epochs", "1",
        "--batch_size", "350", "--n_eval_every_k_iter", "350", "--eval_iter_freq", "2", "--lr_max", "0.01",
        "--attack_iters", "2", "--n_final_eval", "64", "--batch_size_eval", "64", "--clamp_grad", "half",
        "--device", "cpu", "--debug"]
# 3 epochs -> global iterations 0..12, resumable states after epochs 0, 1, 2 (the interrupted-run tests).
RUN = TINY + ["--attack", "fgsm", "--grad_align_cos_lambda", "0.5", "--epochs", "3"]


def run_dir_of(out_dir, argv: list[str]) -> str:
    """The directory train.py gives the run of these flags under out_dir."""
    import train
    cfg, defaults = train.parse_config(list(argv))
    return os.path.join(str(out_dir), train.run_name(cfg, defaults))


class ProcessState:
    """What an in-process call of an entry point must leave as it found it: the stop-signal handlers,
    torch's thread count, the working directory, the environment, the umask, and no run lock's
    refreshing thread still running. Captured when made; restore() puts it back and names what changed.
    The TF32 and cudnn benchmark switches are process-wide settings train.py makes on purpose, and the
    methods a --methods_file registers stay registered as an import would: both restored, not reported."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
    # Set by pytest for each test phase, and by scikit-learn and torch's compiler package when first
    # imported (a module imported during a test): not a test's doing.
    UNWATCHED_ENV = frozenset({"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                               "TORCHINDUCTOR_CACHE_DIR"})

    def __init__(self):
        import torch
        self.handlers = {s: signal.getsignal(s) for s in self.SIGNALS}
        self.threads, self.cwd, self.env = torch.get_num_threads(), os.getcwd(), dict(os.environ)
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.benchmark)
        self.registry = methods.snapshot()

    def restore(self) -> list[str]:
        import torch
        leaked = []
        for s, handler in self.handlers.items():
            if signal.getsignal(s) is not handler:
                leaked.append(f"the {s.name} handler")
                signal.signal(s, handler)
        if torch.get_num_threads() != self.threads:
            leaked.append(f"torch's thread count ({torch.get_num_threads()}, was {self.threads})")
            torch.set_num_threads(self.threads)
        if os.getcwd() != self.cwd:
            leaked.append(f"the working directory ({os.getcwd()})")
            os.chdir(self.cwd)
        env = self.env
        changed = sorted(k for k in (set(env) | set(os.environ)) - self.UNWATCHED_ENV
                         if env.get(k) != os.environ.get(k))
        if changed:
            leaked.append(f"environment variables {changed}")
            for key in changed:
                if key in env:
                    os.environ[key] = env[key]
                else:
                    del os.environ[key]
        umask = os.umask(self.umask)
        if umask != self.umask:
            leaked.append(f"the umask ({oct(umask)}, was {oct(self.umask)})")
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = self.flags
        methods.restore(self.registry)
        for thread in threading.enumerate():
            if thread.name == "run-lock-heartbeat":
                thread.join(timeout=0.2)  # release() joins it: one still running was never released
                if thread.is_alive():
                    leaked.append("a run lock's refreshing thread")
        return leaked


def run_train(tmp_path, *extra: str) -> str:
    """Trains TINY + extra in-process under tmp_path/runs; returns the run directory. For runs a test
    changes or patches (a run only read belongs to the shared tiny_run fixture)."""
    import train
    args = TINY + ["--out_dir", str(tmp_path / "runs"), *extra]
    assert train.main(args) == 0
    return run_dir_of(tmp_path / "runs", args)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def comparable(run_dir: str) -> tuple[list[dict], dict]:
    """metrics.jsonl's rows and final.json without their timing fields (equal for equal runs)."""
    rows = read_metrics(run_dir)
    for row in rows:
        row.pop("elapsed_s"), row.pop("train_minutes")
    final = read_json(os.path.join(run_dir, "final.json"))
    final.pop("train_minutes")
    return rows, final


def write_cifar10(root, train_labels: list[list[int]], test_labels: list[int], seed: int = 0) -> None:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; one label list per batch."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, labels in zip(names, [*train_labels, test_labels]):
        entry = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": list(labels)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def write_cifar100(root, train_labels: list[int], test_labels: list[int], seed: int = 0) -> None:
    """root/cifar-100-python/{train,test,meta}: one pickle per split with 'data' (N, 3072) uint8,
    'fine_labels' (0..99) and 'coarse_labels' (0..19), as the real files have them."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, labels in (("train", train_labels), ("test", test_labels)):
        entry = {"filenames": [f"{name}_{i}.png" for i in range(len(labels))], "batch_label": name,
                 "fine_labels": list(labels), "coarse_labels": [label // 5 for label in labels],
                 "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)


def write_svhn(root, train_labels: list[int], test_labels: list[int], seed: int = 0) -> None:
    """root/{train,test}_32x32.mat with X (32, 32, 3, N) uint8 and y (N, 1), 10 standing for digit 0."""
    from scipy.io import savemat
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        x = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x, "y": np.array(labels, dtype=np.uint8)[:, None]})


def write_mnist(root, n_train: int, n_test: int, seed: int = 0) -> None:
    """root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed IDX files."""
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())


def digits_tensors():
    """scikit-learn's 8x8 digits as x (1797, 1, 8, 8) float32 in [0, 1] (values k/16) and y (1797,) int64."""
    import torch
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return (torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16,
            torch.tensor(bunch.target, dtype=torch.long))


def trained_digits_cnn():
    """A one-layer CNN (8 filters) after 60 full-batch Adam steps (lr 0.01, seed 0) on the first 1000
    digits, in eval mode with frozen parameters, and all the digits (x, y) as digits_tensors() gives them."""
    import torch
    import torch.nn.functional as F

    import models
    x, y = digits_tensors()
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x[:1000]), y[:1000]).backward()
        opt.step()
    return model.eval().requires_grad_(False), x, y


# ------------------------------------------------------------- nothing written: files, lines, eval.py
FGSM_RUN = ["--attack", "fgsm"]  # with TINY (eps 76): the finished run (conftest.finished) most bad-input tests copy


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


EVAL_FAST = ["--n_eval", "8", "--attack_iters", "1", "--n_restarts", "1", "--device", "cpu"]


def eval_main(capsys, *flags: str) -> tuple[int, str, str]:
    """eval.main's exit code, stdout and stderr, on EVAL_FAST's few points."""
    import eval as eval_py
    capsys.readouterr()
    code = eval_py.main([*flags, *EVAL_FAST])
    out, err = capsys.readouterr()
    return code, out, err


def report_main(capsys, *args: str) -> tuple[int, str, str]:
    """report.main's exit code, stdout and stderr."""
    import report
    capsys.readouterr()
    code = report.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class Interrupt(Exception):
    """Raised by stop_after_epoch: a run stopped as a kill right after an epoch's resume.pt would stop it."""


def stop_after_epoch(monkeypatch, epoch: int, exc: type[BaseException] = Interrupt) -> None:
    """Makes train.py raise exc right after it has written the resume.pt of `epoch`."""
    import rundir
    save = rundir.save_resume_state

    def save_then_stop(run_dir, state, generator):
        save(run_dir, state, generator)
        if state["next_epoch"] == epoch + 1:
            raise exc
    monkeypatch.setattr(rundir, "save_resume_state", save_then_stop)
