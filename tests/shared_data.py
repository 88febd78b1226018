"""The evaluation data beside the repository: ../shared/data (MATH-500, GSM8K), as CI has it.
Tests that read it take the `shared_data` fixture (tests/conftest.py), which fails when it is missing."""
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MATH500 = DATA / "math500.jsonl"
GSM8K = DATA / "gsm8k_test.jsonl"
