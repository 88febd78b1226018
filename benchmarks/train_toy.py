"""Rebuild the toy task's shipped checkpoints (builtin:toy-policy-s, toy-policy-l, toy-prm).

    python benchmarks/train_toy.py all                # S, L, then the PRM (from L, on S's samples)
    python benchmarks/train_toy.py policy-s --threads 1
    python benchmarks/train_toy.py policy-l --threads 1   # S and L can run side by side
    python benchmarks/train_toy.py prm                # needs toy-policy-s and toy-policy-l

See benchmarks/toy_training.py for what is trained and how; the log (params, wall time, loss and
greedy accuracy over training, PRM held-out AUC) goes to benchmarks/toy_train_log.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_training import main  # noqa: E402

if __name__ == "__main__":
    main()
