"""`ttc-fast run --workers K` on a local Ray instance with CPU workers (ttc_fast/distributed.py):
the same lines as one process, nothing lost when a worker is killed mid-run, a worker that
cannot start is an error, and a clear error without Ray."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from ttc_fast.cli import main
from ttc_fast.results import read_results
from test_run_cli import N_PROBLEMS, _args, _check_same, full_run, setup  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def local_ray():
    import ray  # the test extras install it
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_write_the_lines_of_one_process(setup, full_run, local_ray, tmp_path, capsys):  # noqa: F811  (fixtures of test_run_cli)
    root, policy, data = setup
    out = tmp_path / "workers.jsonl"
    assert main(_args(policy, data, out, "--workers", "2", "--max-in-flight", "2")) == 0
    assert "2 workers" in capsys.readouterr().out
    _check_same(full_run, out)


@pytest.mark.slow
def test_two_workers_with_a_model_prm_match_one_process(setup, local_ray, tmp_path):  # noqa: F811  (fixtures of test_run_cli)
    """With a model PRM the workers' lines are one process's: the same completions and picks,
    scores within the record comparison's tolerance for batched float sums (1e-5)."""
    from prm_builders import build_math_shepherd_prm

    root, policy, data = setup
    prm = build_math_shepherd_prm(tmp_path / "prm", seed=3)
    outs = {}
    for label, extra in (("one", ()), ("workers", ("--workers", "2", "--max-in-flight", "2"))):
        outs[label] = tmp_path / f"{label}.jsonl"
        args = _args(policy, data, outs[label], "--prm-kind", "math-shepherd", *extra)
        args[args.index("--prm") + 1] = str(prm)
        assert main(args) == 0
    assert all(r["prm_tokens"] > 0 for r in read_results(outs["one"]))
    _check_same(outs["one"], outs["workers"], exact=False)


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(setup, full_run, local_ray, tmp_path):  # noqa: F811  (fixtures of test_run_cli)
    """One worker's process is killed (SIGKILL) once the first line is written: its unfinished
    problems go to the other, every problem is written once, and the lines are one process's."""
    import ttc_fast as tf
    from ttc_fast.data import load_problems
    from ttc_fast.distributed import WorkerSpec, run_distributed
    from ttc_fast.loader import load_tokenizer
    from ttc_fast.prompts import PromptFormat
    from ttc_fast.run import make_strategy

    root, policy, data = setup
    out = tmp_path / "killed.jsonl"
    prompt = PromptFormat()
    spec = WorkerSpec(policy=str(policy), prm="python:test_run_cli:SlowHashVerifier", device="cpu", dtype=None,
                      engine_options={}, prm_kind=None, prm_options={}, strategy=make_strategy("Beam", 4, 2, 2),
                      sampling=tf.SamplingParams(temperature=0.8, top_p=1.0, max_tokens=12, seed=0),
                      prompt={"system_prompt": prompt.system_prompt, "chat_template": prompt.chat_template,
                              "chat_template_kwargs": prompt.chat_template_kwargs},
                      models=None, max_in_flight=1)
    problems = load_problems(data)
    killed = []

    def kill_one(record, pids):
        if not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(pids[1])

    run_distributed(spec, 2, problems, out, load_tokenizer(policy), policy, progress=False, on_result=kill_one)
    assert killed
    assert len(read_results(out)) == N_PROBLEMS
    _check_same(full_run, out, same_models=False)


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_an_error(setup, local_ray, tmp_path, capsys):  # noqa: F811  (fixtures of test_run_cli)
    root, policy, data = setup
    args = _args(policy, data, tmp_path / "x.jsonl", "--workers", "2")
    args[args.index("--prm") + 1] = str(tmp_path / "no-such-prm")
    assert main(args) == 2
    assert "a worker could not start" in capsys.readouterr().err


def test_without_ray_workers_name_the_extra(setup, tmp_path, monkeypatch, capsys):  # noqa: F811  (fixtures of test_run_cli)
    root, policy, data = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(_args(policy, data, tmp_path / "x.jsonl", "--workers", "2")) == 2
    assert 'pip install "ttc_fast[ray]"' in capsys.readouterr().err
