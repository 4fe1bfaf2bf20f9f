"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; run them with -m cuda)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spinning on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
