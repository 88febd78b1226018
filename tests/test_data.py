"""Tests for ttc_fast.data.load_problems on the real data files and on malformed input."""
import json

import pytest

from ttc_fast.data import Problem, load_problems
from ttc_fast.grading import grade

from shared_data import GSM8K, MATH500

needs_data = pytest.mark.usefixtures("shared_data")  # fails when ../shared/data is missing


@needs_data
def test_load_math500():
    ps = load_problems(MATH500)
    assert len(ps) == 500
    assert all(isinstance(p, Problem) and p.kind == "math" for p in ps)
    assert len({p.id for p in ps}) == 500
    first = json.loads(MATH500.read_text().splitlines()[0])
    assert ps[0].id == first["unique_id"]
    assert ps[0].question == first["problem"]
    assert ps[0].answer == first["answer"]
    assert ps[0].meta["level"] == first["level"] and ps[0].meta["subject"] == first["subject"]
    assert all(p.answer and p.question for p in ps)


@needs_data
def test_load_gsm8k():
    ps = load_problems(str(GSM8K))
    assert len(ps) == 1319
    assert all(p.kind == "gsm8k" for p in ps)
    assert [p.id for p in ps[:3]] == ["line-1", "line-2", "line-3"]
    assert ps[0].answer == "18"  # Janet's ducks
    assert "####" in ps[0].meta["solution"]
    for p in ps:
        float(p.answer)
        assert grade(p.meta["solution"], p.answer, "gsm8k")  # the reference solution grades correct


def _write(tmp_path, lines):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_blank_lines_and_ids(tmp_path):
    f = _write(tmp_path, [
        "",
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "a/1.json", "level": 1}),
        "   ",
        json.dumps({"problem": "2+2?", "answer": " 4 "}),
        json.dumps({"question": "3+3?", "answer": "3+3=6\n#### 6"}),
    ])
    ps = load_problems(f)
    assert [(p.id, p.answer, p.kind) for p in ps] == [
        ("a/1.json", "2", "math"), ("line-4", "4", "math"), ("line-5", "6", "gsm8k")]
    assert ps[0].meta == {"level": 1}


@pytest.mark.parametrize(
    "bad,msg",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"answer": "2"}), "'problem'"),
        (json.dumps({"problem": "x"}), "'answer'"),
        (json.dumps({"problem": 3, "answer": "2"}), "'problem' must be a string"),
        (json.dumps({"problem": "x", "answer": 2}), "'answer' must be a string"),
        (json.dumps({"problem": "x", "answer": "2", "unique_id": [1]}), "unique_id"),
        (json.dumps({"question": "x", "answer": "no marker"}), "####"),
        (json.dumps({"problem": "", "answer": "2"}), "empty"),
        (json.dumps({"problem": "dup", "answer": "2", "unique_id": "u"}), "duplicate id"),
    ],
)
def test_malformed_line_reports_file_and_line(tmp_path, bad, msg):
    good = json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "u"})
    f = _write(tmp_path, [good, "", bad, good.replace('"u"', '"v"')])
    with pytest.raises(ValueError) as e:
        load_problems(f)
    text = str(e.value)
    assert f"{f}:3:" in text and msg in text


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(missing)
