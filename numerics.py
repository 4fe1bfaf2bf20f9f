"""What a run's numbers depend on besides its settings: the CPU thread count, the hardware, the torch
and CUDA versions and the determinism switches. config.json records them under "numerics"
(docs/reproducing.md says which of them change the numbers, and by how much). torch is imported only
by the functions that need it: report.py reads DECISIVE.

    with numerics.threads(cfg.threads):   # --threads: torch's intra-op thread count, restored after
        ...
    numerics.describe(device)              # {"threads": 1, "cpu": "...", "torch": "2.14.1", ...}
"""
from __future__ import annotations

import contextlib
import platform

# The keys of describe() that change a number when they change (report.py marks a group of runs whose
# records disagree in one of them); the others say where the run ran.
DECISIVE = ("threads", "device_type", "gpu", "torch", "cuda", "deterministic_algorithms", "cudnn_benchmark",
            "tf32_matmul", "tf32_cudnn")


@contextlib.contextmanager
def threads(count: int | None):
    """torch's intra-op CPU thread count set to count inside the block (None: left as it is), and put
    back after it, so an entry point called in a test process leaves that process as it found it."""
    import torch
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports, else ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device) -> dict:
    """The numerics in force now, for a run on device: thread counts, CPU model, the GPU's name and how
    many GPUs torch sees, the torch, CUDA and cuDNN versions, and the determinism and TF32 switches.
    device: a torch.device."""
    import torch
    on_cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn
    return {
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "device_type": device.type, "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(cudnn.deterministic), "cudnn_benchmark": bool(cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "tf32_cudnn": bool(cudnn.allow_tf32),
    }


def differences(recorded: dict | None, now: dict) -> list[str]:
    """The DECISIVE keys in which two describe() records disagree, as 'key now (recorded: value)';
    a record that lacks a key (an older run) does not disagree in it."""
    recorded = recorded if isinstance(recorded, dict) else {}
    return [f"{key} {now.get(key)} (recorded: {recorded[key]})" for key in DECISIVE
            if key in recorded and recorded[key] != now.get(key)]
