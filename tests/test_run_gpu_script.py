"""benchmarks/run_gpu.sh, the one call a lent GPU gets: its dry run (every stage on the CPU, every
shape tiny) end to end, as CI runs it, and its exit status when a stage fails or pytest is absent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu.sh"
STAGES = ["build", "numerics", "tests", "bench_kernels", "bench_host", "bench_generate", "bench_search"]
JSON_FILES = ["summary.json", "numerics.json", "bench_kernels.json", "bench_host.json", "bench_generate.json",
              "bench_search.json"]


def run_script(tmp_path, *args, **env_extra):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env_extra}
    env.pop("TRITON_INTERPRET", None)  # as on the device machine: the scripts set it where kernels need it
    p = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return p, out


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    p, out = run_script(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8, files
    assert set(files) == set(JSON_FILES) | {"run_gpu.log"}, files
    data = {name: json.loads((out / name).read_text()) for name in JSON_FILES}
    summary = data["summary.json"]
    assert summary["dry_run"] and summary["ok"]
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" and s["exit"] == 0 for s in summary["stages"]), summary["stages"]
    env = summary["environment"]
    assert env["python"] and env["torch"] and env["triton"] and env["transformers"] and env["cuda_available"] is False
    assert summary["tests"]["status"] == "passed" and summary["tests"]["counts"]["passed"] > 0
    numerics = data["numerics.json"]
    assert numerics["failed"] == [] and numerics["info"]["cases"] > 0
    assert {c["family"] for c in numerics["cases"]} >= {"decode", "cascade", "extend", "kv_store", "block_copy",
                                                      "logsoftmax_topk", "sampling"}
    assert {c["dtype"] for c in numerics["cases"]} == {"fp32", "fp16", "bf16"}
    assert set(data["bench_search.json"]) == {"N=16", "N=64", "N=256"}
    assert all(v["status"] == "ok" and "result" in v for v in data["bench_search.json"].values())
    log = (out / "run_gpu.log").read_text()
    for st in STAGES:
        assert f"] {st} (cap " in log and f"===== {st}: ok, exit 0, " in log


def test_unknown_stage_is_refused(tmp_path):
    p, _ = run_script(tmp_path, "--dry-run", "no_such_stage")
    assert p.returncode == 2 and "unknown stage" in p.stderr


def test_failing_stage_fails_the_run(tmp_path):
    """A stage whose command fails: recorded in the log, and the script exits nonzero."""
    p, out = run_script(tmp_path, "--dry-run", "bench_host", PYTHON="false")
    assert p.returncode == 1
    assert "===== bench_host: failed, exit 1, " in (out / "run_gpu.log").read_text()


def test_missing_pytest_is_recorded_not_fatal(tmp_path):
    """Without pytest the tests stage says so and is skipped; the run still passes."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "pytest.py").write_text("raise ImportError('pytest hidden by the test')\n")
    pythonpath = os.pathsep.join(x for x in (str(hide), os.environ.get("PYTHONPATH")) if x)
    p, out = run_script(tmp_path, "--dry-run", "tests", PYTHONPATH=pythonpath)
    assert p.returncode == 0, p.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("tests", "skipped (pytest not importable)")]
    assert summary["ok"] and summary["tests"]["status"] == "pytest not importable"
    assert "pytest is not importable" in (out / "run_gpu.log").read_text()
