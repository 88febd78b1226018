"""`ttc-fast run`: end to end on a tiny random policy with a Python verifier, resume after a kill,
and the errors (malformed JSONL, unknown strategy, existing OUT, no policy, no verifier)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from ttc_fast.cli import main
from ttc_fast.results import VOLATILE_FIELDS, canonical, differences, read_results, summarize
from ttc_fast.run import run_search

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

LINE_KEYS = {"id", "question", "gold", "strategy", "n", "width", "iterations", "aggregation", "options", "config", "prompt",
             "models", "completions", "picks", "correct", "policy_tokens", "prm_tokens", "compute", "seconds"}
COMPLETION_KEYS = {"text", "steps", "step_scores", "score", "answer", "finish_reason", "policy_tokens"}


class HashVerifier:
    """A deterministic verifier with the interface TreeSearch needs: each path's score is a hash
    of its question and steps, in [0, 1); tokens are counted as words."""

    def __init__(self):
        self.tokens_processed = 0
        self._next = 0
        self._paths: dict[int, str] = {}

    def start(self, question):
        self._next += 1
        self._paths[self._next] = question
        return self._next

    def fork(self, handle, n):
        out = []
        for _ in range(n):
            self._next += 1
            self._paths[self._next] = self._paths[handle]
            out.append(self._next)
        return out

    def free(self, handle):
        self._paths.pop(handle, None)

    def score_steps(self, handles, steps):
        scores = []
        for h, step in zip(handles, steps):
            self._paths[h] = self._paths[h] + "\n\n" + step
            self.tokens_processed += len(step.split()) + 1
            scores.append((zlib.crc32(self._paths[h].encode("utf-8")) % 1000) / 1000)
        return scores


class SlowHashVerifier(HashVerifier):
    """HashVerifier's scores, a quarter of a second per call: a run of N_PROBLEMS one at a time
    takes seconds, so a kill after its first line lands mid-run."""

    def score_steps(self, handles, steps):
        time.sleep(0.25)
        return super().score_steps(handles, steps)


def hash_score(question, steps):
    """A plain callable verifier, fn(question, steps) -> the latest step's score (for load_prm)."""
    return (zlib.crc32((question + "\n\n" + "\n\n".join(steps)).encode("utf-8")) % 1000) / 1000


VERIFIER = "python:test_run_cli:HashVerifier"
N_PROBLEMS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ttc_fast.testing import build_tiny_model

    root = tmp_path_factory.mktemp("run_cli")
    policy = build_tiny_model(root / "policy", "llama", seed=0)
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(N_PROBLEMS):
            f.write(json.dumps({"problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3), "unique_id": f"p{i}"}) + "\n")
    return root, policy, data


def _args(policy, data, out, *extra):
    return ["run", "--policy", str(policy), "--prm", VERIFIER, "--strategy", "beam", "--n", "4", "--width", "2",
            "--iterations", "2", "--max-tokens", "12", "--data", str(data), "--out", str(out), "--device", "cpu",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def full_run(setup):
    """One uninterrupted CLI run over every problem (batched: all in flight together)."""
    root, policy, data = setup
    out = root / "full.jsonl"
    assert main(_args(policy, data, out)) == 0
    return out


def _check_same(a_path, b_path, exact: bool = True, same_models: bool = True):
    """The same results (see ttc_fast.run: "the same file"); `exact`: bit for bit, as a
    verifier whose scores do not depend on the batch gives; not `same_models`: the runs' models
    differ on purpose (a slower twin of the verifier), so their records are not compared."""
    a, b = read_results(a_path), read_results(b_path)
    if not same_models:
        for r in a + b:
            r.pop("models")
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in b) == [f"p{i}" for i in range(N_PROBLEMS)]
    assert differences(a, b) == []
    if exact:
        assert canonical(a) == canonical(b)
    assert len(b_path.read_text().splitlines()) == N_PROBLEMS  # one line per problem, no duplicates


# (a) ------------------------------------------------------------------------------------------------
def test_cli_end_to_end_writes_one_line_per_problem(setup, full_run, capsys):
    lines = full_run.read_text(encoding="utf-8").splitlines()
    assert len(lines) == N_PROBLEMS
    records = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(N_PROBLEMS)]
    for r in records:
        assert set(r) == LINE_KEYS
        assert (r["strategy"], r["n"], r["width"], r["iterations"], r["aggregation"]) == ("BeamSearch", 4, 2, 2, "last")
        assert r["options"] == {"delimiter": "\n\n", "lookahead": 0, "filter_duplicates": False}
        assert r["config"] == {"temperature": 0.8, "top_p": 1.0, "max_tokens": 12, "seed": 0}
        assert len(r["completions"]) == 4
        for c in r["completions"]:
            assert set(c) == COMPLETION_KEYS
            assert len(c["steps"]) == len(c["step_scores"]) >= 1
            assert c["score"] == c["step_scores"][-1]  # aggregation "last"
            assert all(0 <= s < 1 for s in c["step_scores"])
        assert set(r["picks"]) == set(r["correct"]) == {"1", "2", "4"}
        for k in ("1", "2", "4"):
            assert set(r["picks"][k]) == set(r["correct"][k]) == {"maj", "naive", "weighted"}
        assert r["policy_tokens"] >= sum(c["policy_tokens"] for c in r["completions"][:1]) > 0
        assert r["prm_tokens"] > 0 and r["seconds"] > 0
    table = summarize(records)
    assert "maj" in table and "weighted" in table and "policy tokens" in table
    # the same settings again: identical content (seeded)
    root, policy, data = setup
    again = root / "again.jsonl"
    assert main(_args(policy, data, again)) == 0
    assert "wall time" in capsys.readouterr().out
    _check_same(full_run, again)


# (b) ------------------------------------------------------------------------------------------------
def test_resume_after_truncated_last_line_matches_uninterrupted(setup, full_run):
    """A run cut off mid-line: two complete lines and half of the third; --resume drops the
    half line, repairs the file and runs only the missing problems."""
    root, policy, data = setup
    raw = full_run.read_bytes()
    lines = raw.split(b"\n")
    partial = root / "partial.jsonl"
    partial.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + lines[2][: len(lines[2]) // 2])
    assert main(_args(policy, data, partial, "--resume")) == 0
    _check_same(full_run, partial)
    # the two finished problems were kept byte for byte, not recomputed
    assert partial.read_bytes().split(b"\n")[:2] == lines[:2]


def kill_after_first_line(argv: list[str], out: Path, seconds: float) -> None:
    """Run `python -m ttc_fast.cli *argv` in a real process and kill it (SIGKILL) once OUT holds
    its first line; fails if it finished or wrote nothing within `seconds`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "ttc_fast.cli", *argv],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.stat().st_size > 0:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert out.exists() and out.stat().st_size > 0, err.decode(errors="replace")[-2000:]
    assert proc.returncode == -signal.SIGKILL  # killed, not finished


@pytest.mark.slow
def test_resume_after_killed_process_matches_uninterrupted(setup, full_run):
    """A real `python -m ttc_fast.cli run` killed (SIGKILL) once its first line is on disk (its
    verifier is slow, so the kill lands mid-run), resumed with the same verifier (a resume
    refuses another one: the lines record it)."""
    root, policy, data = setup
    out = root / "killed.jsonl"
    slow = _args(policy, data, out, "--max-in-flight", "1")
    slow[slow.index("--prm") + 1] = "python:test_run_cli:SlowHashVerifier"
    kill_after_first_line(slow, out, seconds=60)
    before = read_results(out)
    assert 1 <= len(before) < N_PROBLEMS
    assert main(slow + ["--resume"]) == 0
    _check_same(full_run, out, same_models=False)


@pytest.mark.slow
def test_resume_with_a_model_prm_matches_uninterrupted(setup, tmp_path):
    """With a real (tiny, fp32) math-shepherd PRM: a run cut after two problems and resumed one
    problem at a time (other batches than the uninterrupted run's) gives the same results: the
    same texts, steps, answers and picks, scores within 1e-5."""
    from prm_builders import build_math_shepherd_prm

    root, policy, data = setup
    prm = build_math_shepherd_prm(tmp_path / "prm", seed=3)

    def args(out, *extra):
        a = _args(policy, data, out, "--prm-kind", "math-shepherd", *extra)
        a[a.index("--prm") + 1] = str(prm)
        return a

    full = tmp_path / "full.jsonl"
    assert main(args(full)) == 0
    assert all(r["prm_tokens"] > 0 for r in read_results(full))
    lines = full.read_bytes().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + lines[2][:10])
    assert main(args(cut, "--resume", "--max-in-flight", "1")) == 0
    _check_same(full, cut, exact=False)


@pytest.mark.slow
def test_resume_checks_every_line_and_the_verifier(setup, full_run, tmp_path, capsys):
    """A line from before lines recorded `options` counts as the class defaults; a line with
    other settings anywhere in the file, or written with(out) a verifier, is refused."""
    root, policy, data = setup
    lines = [json.loads(line) for line in full_run.read_text().splitlines()]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "options"}) + "\n" for r in lines[:2]))
    assert main(_args(policy, data, old, "--resume")) == 0  # defaults: lookahead 0
    without_options = [[{k: v for k, v in r.items() if k != "options"} for r in read_results(path)] for path in (full_run, old)]
    assert canonical(without_options[0]) == canonical(without_options[1])
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "options"}) + "\n" for r in lines[:2]))
    assert main(_args(policy, data, old, "--resume", "--lookahead", "1")) == 2
    assert "line 1" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(lines[0]) + "\n" + json.dumps(dict(lines[1], aggregation="min")) + "\n")
    assert main(_args(policy, data, mixed, "--resume")) == 2
    assert "line 2" in capsys.readouterr().err
    majority = _args(policy, data, tmp_path / "maj.jsonl", "--limit", "2")
    majority[majority.index("--strategy") + 1] = "majority"
    assert main(majority) == 0  # with the verifier: maj, naive and weighted
    i = majority.index("--prm")
    del majority[i:i + 2]
    assert main(majority + ["--resume"]) == 2
    assert "with a verifier" in capsys.readouterr().err


def test_summary_counts_each_pick_over_the_lines_that_have_it():
    records = [{"correct": {"1": {"maj": True, "naive": True, "weighted": False}}},
               {"correct": {"1": {"maj": False}}}]
    row = [line for line in summarize(records).splitlines() if line.split()[:1] == ["1"]][0].split()
    assert row[1:4] == ["50.0%", "100.0%", "0.0%"]


def test_resume_of_a_complete_file_runs_nothing(setup, full_run, tmp_path):
    root, policy, data = setup
    out = tmp_path / "done.jsonl"
    out.write_bytes(full_run.read_bytes())
    assert main(_args(policy, data, out, "--resume")) == 0
    assert out.read_bytes() == full_run.read_bytes()


def test_resume_with_other_settings_is_an_error(setup, full_run, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "other.jsonl"
    out.write_bytes(full_run.read_bytes().split(b"\n")[0] + b"\n")
    args = _args(policy, data, out, "--resume")
    args[args.index("--n") + 1] = "2"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err


def test_run_search_api_matches_cli(setup, full_run, tmp_path):
    """run_search called directly with a verifier object gives the CLI's records."""
    import ttc_fast as tf
    from ttc_fast.data import load_problems
    from ttc_fast.run import make_strategy

    from ttc_fast.identity import run_models

    root, policy, data = setup
    engine = tf.Engine(tf.load_model(policy, device="cpu"))
    out = tmp_path / "api.jsonl"
    verifier = HashVerifier()
    records = run_search(engine, verifier, make_strategy("Beam", 4, 2, 2),
                         tf.SamplingParams(temperature=0.8, top_p=1.0, max_tokens=12, seed=0),
                         load_problems(data), out, progress=False,
                         models=run_models(engine.model, verifier, VERIFIER)).records
    assert len(records) == N_PROBLEMS
    assert canonical(records) == canonical(read_results(full_run))
    assert set(VOLATILE_FIELDS) <= set(records[0])


# (c)-(e) and other errors -------------------------------------------------------------------------
def test_malformed_jsonl_reports_line_number(setup, tmp_path, capsys):
    root, policy, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "2+2?", "answer": \n')
    out = tmp_path / "out.jsonl"
    assert main(_args(policy, bad, out)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "invalid JSON" in err
    assert not out.exists()


def test_missing_data_file(setup, tmp_path, capsys):
    root, policy, _ = setup
    assert main(_args(policy, tmp_path / "nope.jsonl", tmp_path / "out.jsonl")) == 2
    assert "problem file not found" in capsys.readouterr().err


def test_unknown_strategy_lists_the_valid_ones(setup, tmp_path, capsys):
    root, policy, data = setup
    args = _args(policy, data, tmp_path / "out.jsonl")
    args[args.index("--strategy") + 1] = "monte-carlo"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'monte-carlo'" in err
    for name in ("best-of-n", "majority", "weighted-best-of-n", "beam", "dvts"):
        assert name in err


@pytest.mark.parametrize("name,cls", [("BEST-OF-N", "BestOfN"), ("Majority", "MajorityVote"), ("weighted-best-of-n", "WeightedBestOfN"),
                                      ("Beam", "BeamSearch"), ("DVTS", "DVTS"), ("beamsearch", "BeamSearch")])
def test_strategy_names_case_insensitive(name, cls):
    from ttc_fast.run import make_strategy

    s = make_strategy(name, 4, 2, 3)
    assert type(s).__name__ == cls and s.n == 4
    if hasattr(s, "width"):
        assert (s.width, s.iterations) == (2, 3)


@pytest.mark.slow
def test_lookahead_and_particle_filtering_temperature_reach_the_strategy(setup, tmp_path, capsys):
    from ttc_fast.run import make_strategy

    assert make_strategy("beam", 4, 2, 3, lookahead=2).lookahead == 2
    assert make_strategy("dvts", 4, 2, 3, lookahead=1).lookahead == 1
    assert make_strategy("particle-filtering", 4, pf_temperature=0.3).temperature == 0.3
    root, policy, data = setup
    out = tmp_path / "look.jsonl"
    assert main(_args(policy, data, out, "--lookahead", "1", "--limit", "1")) == 0
    assert read_results(out)[0]["options"] == {"delimiter": "\n\n", "lookahead": 1, "filter_duplicates": False}
    # resuming with another lookahead is refused (the file's settings differ)
    assert main(_args(policy, data, out, "--lookahead", "2", "--resume")) == 2
    assert "lookahead" in capsys.readouterr().err
    args = _args(policy, data, tmp_path / "pf.jsonl", "--pf-temperature", "0.5")  # beam has no such setting
    assert main(args) == 2
    assert "--pf-temperature does not apply to BeamSearch" in capsys.readouterr().err


def test_majority_without_a_verifier_reports_the_majority_pick_only(setup, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "maj.jsonl"
    args = _args(policy, data, out, "--limit", "2")
    i = args.index("--prm")
    del args[i:i + 2]
    args[args.index("--strategy") + 1] = "majority"
    assert main(args) == 0
    records = read_results(out)
    assert all(set(p) == {"maj"} for r in records for p in r["picks"].values())
    table = capsys.readouterr().out
    assert "maj" in table and "weighted" not in table and "naive" not in table


def test_existing_out_without_resume_is_an_error(setup, full_run, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "exists.jsonl"
    content = full_run.read_bytes()
    out.write_bytes(content)
    assert main(_args(policy, data, out)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert out.read_bytes() == content  # untouched


def test_data_without_policy_is_refused(capsys):
    assert main(["run", "--data", "x.jsonl"]) == 2
    assert "need --policy" in capsys.readouterr().err
    assert main(["run", "--out", "x.jsonl"]) == 2  # the toy task would ignore it
    assert "--out-dir" in capsys.readouterr().err


def test_search_strategy_without_verifier(setup, tmp_path, capsys):
    root, policy, data = setup
    args = _args(policy, data, tmp_path / "out.jsonl")
    i = args.index("--prm")
    del args[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--prm" in err and "majority" in err


def test_plain_callable_verifier_through_load_prm(setup, tmp_path):
    """--prm python:MODULE:FUNCTION naming a plain function goes through ttc_fast.prm.load_prm."""
    root, policy, data = setup
    out = tmp_path / "callable.jsonl"
    args = _args(policy, data, out, "--limit", "2")
    args[args.index("--prm") + 1] = "python:test_run_cli:hash_score"
    assert main(args) == 0
    records = read_results(out)
    assert sorted(r["id"] for r in records) == ["p0", "p1"]
    assert all(0 <= s < 1 for r in records for c in r["completions"] for s in c["step_scores"])


def test_missing_prm_checkpoint(setup, tmp_path, capsys):
    root, policy, data = setup
    args = _args(policy, data, tmp_path / "out.jsonl")
    args[args.index("--prm") + 1] = str(tmp_path / "no-such-prm")
    assert main(args) == 2
    assert "no-such-prm" in capsys.readouterr().err


def test_bad_verifier_spec(setup, tmp_path, capsys):
    root, policy, data = setup
    args = _args(policy, data, tmp_path / "out.jsonl")
    args[args.index("--prm") + 1] = "python:test_run_cli:NoSuchVerifier"
    assert main(args) == 2
    assert "NoSuchVerifier" in capsys.readouterr().err


def test_read_results_repairs_only_the_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x": [1, 2')
    assert [r["id"] for r in read_results(path, repair=True)] == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        read_results(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(ValueError, match="twice"):
        read_results(path)


# --- prompts, presets, export ----------------------------------------------------------------------
def _settings(*argv):
    from ttc_fast.cli import build_parser
    from ttc_fast.run_options import resolve_run_settings

    return resolve_run_settings(build_parser().parse_args(["run", "--policy", "p", *argv]))


def test_preset_sal_fills_every_setting_and_flags_override_it(tmp_path):
    from ttc_fast.presets import sal_preset

    sal = sal_preset()
    assert sal["source"]["commit"] == "6f81cac8b1ca4c4be9fabefc27a856c928f3ae7f"
    got = _settings("--preset", "sal", "--strategy", "beam")
    assert {k: got[k] for k in ("n", "temperature", "top_p", "max_tokens", "seed", "width", "iterations", "lookahead",
                                "aggregation", "filter_duplicates", "prm_layout")} == {
        "n": 4, "temperature": 0.8, "top_p": 1.0, "max_tokens": 2048, "seed": 0, "width": 4, "iterations": 40,
        "lookahead": 0, "aggregation": "last", "filter_duplicates": True, "prm_layout": "sal"}
    assert got["system_prompt"] == sal["system_prompt"] and got["chat_template"] == "sal-auto"
    assert "filter_duplicates" not in _settings("--preset", "sal", "--strategy", "dvts")  # only its beam recipe
    assert "lookahead" not in _settings("--preset", "sal", "--strategy", "best-of-n")
    prompt = tmp_path / "system.txt"
    prompt.write_text("Be brief.")
    over = _settings("--preset", "sal", "--n", "16", "--temperature", "0.4", "--seed", "7", "--no-filter-duplicates",
                     "--system-prompt", f"@{prompt}", "--chat-template", "checkpoint", "--prm-layout", "model-card")
    assert (over["n"], over["temperature"], over["seed"], over["filter_duplicates"]) == (16, 0.4, 7, False)
    assert (over["system_prompt"], over["chat_template"], over["prm_layout"]) == ("Be brief.", "checkpoint", "model-card")
    assert _settings("--system-prompt", "")["system_prompt"] == ""  # none, not the default
    plain = _settings()
    assert plain["system_prompt"] is None and plain["chat_template"] is None and "prm_layout" not in plain


def test_preset_chat_template_is_sals_for_llama3_policies_only(tmp_path):
    from transformers import AutoTokenizer

    from ttc_fast.run_options import chat_template_for
    from ttc_fast.presets import sal_preset
    from prm_builders import build_qwen_prm, build_rlhflow_prm

    llama3 = AutoTokenizer.from_pretrained(str(build_rlhflow_prm(tmp_path / "llama3")))
    chatml = AutoTokenizer.from_pretrained(str(build_qwen_prm(tmp_path / "qwen")))
    assert chat_template_for("sal-auto", llama3) == sal_preset()["llama3_chat_template"]
    assert chat_template_for("sal-auto", chatml) is None  # the checkpoint's own, as its Qwen recipes
    assert chat_template_for("none", chatml) == "" and chat_template_for("checkpoint", llama3) is None
    # search-and-learn's template writes no BOS; the Llama 3 tokenizer's BOS is added once
    from ttc_fast.prompts import encode_prompt

    from tokenizers.processors import TemplateProcessing

    llama3.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", llama3.convert_tokens_to_ids("<|begin_of_text|>"))])
    ids = encode_prompt("What is 2 + 3?", llama3, sal_preset()["system_prompt"], sal_preset()["llama3_chat_template"],
                        {"date_string": "26 Jul 2024"})
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    text = llama3.decode(ids[1:])
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                           "Today Date: 26 Jul 2024\n\nSolve the following math problem efficiently and clearly:")
    assert text.endswith("What is 2 + 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prm_options_reach_only_the_formats_that_have_them():
    from ttc_fast.cli import build_parser
    from ttc_fast.run_options import prm_options, resolve_run_settings
    from ttc_fast.presets import sal_preset

    def options(*argv):
        args = build_parser().parse_args(["run", "--policy", "p", *argv])
        return prm_options(args, resolve_run_settings(args))

    sal = sal_preset()["system_prompt"]
    assert options("--preset", "sal", "--prm-kind", "math-shepherd") == {"layout": "sal", "system_prompt": sal}
    assert options("--preset", "sal", "--prm-kind", "rlhflow") == {}
    assert options("--preset", "sal") == {}  # a python: verifier, or a kind read from the checkpoint
    assert options("--preset", "sal", "--prm-kind", "math-shepherd", "--system-prompt", "Be brief.") == {
        "layout": "sal", "system_prompt": "Be brief."}
    assert options("--prm-kind", "math-shepherd", "--prm-step-separator", "\\n\\n") == {"step_separator": "\n\n"}
    assert options("--prm-layout", "model-card") == {"layout": "model-card"}


@pytest.mark.slow
def test_prompt_settings_are_recorded_and_checked_on_resume(setup, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "brief.jsonl"
    assert main(_args(policy, data, out, "--limit", "2", "--system-prompt", "Be brief.")) == 0
    lines = read_results(out)
    assert [r["prompt"] for r in lines] == [{"system_prompt": "Be brief.", "chat_template": "checkpoint",
                                             "chat_template_kwargs": {}}] * 2
    assert main(_args(policy, data, out, "--resume")) == 2  # the default system prompt now
    assert "prompt" in capsys.readouterr().err
    prompt = tmp_path / "system.txt"
    prompt.write_text("Be brief.")
    assert main(_args(policy, data, out, "--resume", "--system-prompt", f"@{prompt}")) == 0
    assert len(read_results(out)) == N_PROBLEMS
    # lines from before lines recorded the prompt (and filter_duplicates) resume as the defaults
    old = tmp_path / "old.jsonl"
    rows = [{k: v for k, v in r.items() if k != "prompt"} for r in read_results(out)[:2]]
    for r in rows:
        r["options"].pop("filter_duplicates")
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_args(policy, data, old, "--resume")) == 0


def test_bad_prompt_flags_are_clear_errors(setup, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "x.jsonl"
    assert main(_args(policy, data, out, "--chat-template-kwargs", "{enable_thinking: false}")) == 2
    assert "--chat-template-kwargs is not valid JSON" in capsys.readouterr().err
    assert main(_args(policy, data, out, "--chat-template-kwargs", "[1]")) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert main(_args(policy, data, out, "--system-prompt", "@/no/such/file")) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(_args(policy, data, out, "--chat-template", "/no/such/template.jinja")) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0]['content'] | no_such_filter }}")
    assert main(_args(policy, data, out, "--overwrite", "--chat-template", str(broken))) == 2
    err = capsys.readouterr().err
    assert "chat template failed" in err and str(policy) in err and "Traceback" not in err
    assert main(["run", "--preset", "sal"]) == 2  # the toy task has its own settings
    assert "--preset need --policy" in capsys.readouterr().err


def test_export_sal_columns(setup, full_run, tmp_path, capsys):
    root, policy, data = setup
    out = tmp_path / "sal.jsonl"
    assert main(["export", "--format", "sal", str(full_run), "--out", str(out), "--data", str(data)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = {r["id"]: r for r in read_results(full_run)}
    assert [r["unique_id"] for r in rows] == [f"p{i}" for i in range(N_PROBLEMS)]  # the data file's order
    for row in rows:
        rec = records[row["unique_id"]]
        assert row["problem"] == rec["question"] and row["answer"] == rec["gold"]
        assert row["completions"] == [c["text"] for c in rec["completions"]]
        assert row["scores"] == [c["step_scores"] for c in rec["completions"]]
        assert row["agg_scores"] == [c["score"] for c in rec["completions"]]
        assert row["pred"] == max(rec["completions"], key=lambda c: c["score"])["text"]
        for n in ("1", "2", "4"):
            for pick in ("maj", "naive", "weighted"):
                assert row[f"pred_{pick}@{n}"] == "\\boxed{" + (rec["picks"][n][pick] or "") + "}"
    assert main(["export", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# shards and merge ------------------------------------------------------------------------------------
def test_shards_merged_are_the_unsharded_run(setup, full_run, tmp_path, capsys):
    """--shard 0/2 and 1/2 (every other problem), merged: the same file as one run over all."""
    root, policy, data = setup
    shards = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(shards):
        assert main(_args(policy, data, out, "--shard", f"{i}/2")) == 0
    assert [r["id"] for r in read_results(shards[0])] == ["p0", "p2", "p4"]
    merged = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    assert "merged 5 problems from 2 files" in capsys.readouterr().out
    _check_same(full_run, merged)
    models = read_results(merged)[0]["models"]
    assert models["policy"]["path"] == str(policy) and len(models["policy"]["config_sha256"]) == 64
    assert models["prm"] == {"spec": VERIFIER, "kind": None, "config_sha256": None, "cost": None}


def _edited(src, dst, edit):
    records = read_results(src)
    edit(records[0])
    dst.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dst


def test_merge_refuses_duplicates_other_settings_and_other_models(setup, full_run, tmp_path, capsys):
    root, policy, data = setup
    shard = tmp_path / "shard0.jsonl"
    assert main(_args(policy, data, shard, "--shard", "0/3")) == 0
    out = tmp_path / "all.jsonl"
    assert main(["merge", str(full_run), str(shard), "--out", str(out)]) == 2
    assert "'p0' is in" in capsys.readouterr().err and not out.exists()

    def seed(r):
        r["config"]["seed"] = 7

    def policy_hash(r):
        r["models"]["policy"]["config_sha256"] = "0" * 64

    def verifier(r):
        r["models"]["prm"]["spec"] = "python:other:Verifier"

    for edit, expected in ((seed, "(config)"), (policy_hash, "models: the policy"), (verifier, "models: the verifier")):
        rest = tmp_path / "rest.jsonl"
        rest.write_text("".join(json.dumps(r) + "\n" for r in read_results(full_run) if r["id"] not in ("p0", "p3")))
        other = _edited(shard, tmp_path / "other.jsonl", edit)
        assert main(["merge", str(rest), str(other), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and expected in err, err
    # a shard on another path to the same checkpoint merges: the configuration is compared
    moved = _edited(shard, tmp_path / "moved.jsonl", lambda r: r["models"]["policy"].update(path="/elsewhere/policy"))
    assert main(["merge", str(rest), str(moved), "--out", str(out)]) == 0
    assert main(["merge", str(rest), str(moved), "--out", str(out)]) == 2  # exists: --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(rest), str(moved), "--out", str(out), "--overwrite"]) == 0


def test_bad_shard_and_resume_with_another_model(setup, full_run, tmp_path, capsys):
    root, policy, data = setup
    for bad in ("2/2", "1", "a/b", "0/0"):
        assert main(_args(policy, data, tmp_path / "x.jsonl", "--shard", bad)) == 2
        assert "--shard must be I/K" in capsys.readouterr().err
    assert main(_args(policy, data, tmp_path / "x.jsonl", "--limit", "1", "--shard", "1/2")) == 2
    assert "no problem falls in it" in capsys.readouterr().err
    other = _edited(full_run, tmp_path / "other.jsonl", lambda r: r["models"]["policy"].update(config_sha256="0" * 64))
    assert main(_args(policy, data, other, "--resume")) == 2
    assert "models: the policy" in capsys.readouterr().err
