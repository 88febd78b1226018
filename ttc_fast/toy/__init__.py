"""The built-in toy task: arithmetic word problems, their tokenizer, checker and training.

    from ttc_fast.toy import eval_problems, check_step
    problems = eval_problems()                     # 250 fixed problems (kind "math")
    prm = load_prm(check_step)                     # builtin:toy-checker, the hard-coded verifier

Trained checkpoints ship as builtin:toy-policy-s, builtin:toy-policy-l and builtin:toy-prm
(math-shepherd format); `benchmarks/train_toy.py` (benchmarks/toy_training.py) rebuilds them.
"""
from .task import (DEV_SEED, EVAL_SEED, LEVELS, check_step, dev_problems, eval_problems, make_dataset, make_problem,
                   prefix_labels, solve)

toy_checker = check_step  # builtin:toy-checker

__all__ = ["DEV_SEED", "EVAL_SEED", "LEVELS", "check_step", "dev_problems", "eval_problems", "make_dataset",
           "make_problem", "prefix_labels", "solve", "toy_checker"]
