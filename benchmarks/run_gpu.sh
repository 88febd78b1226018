#!/usr/bin/env bash
# Everything a lent GPU should run, in at most 6 minutes on one H200 (device tool:
# `bash benchmarks/run_gpu.sh`; a lent GPU comes with 15 minutes in all, its start-up included,
# so a rerun fits too).
#
#   bash benchmarks/run_gpu.sh [--dry-run] [STAGE ...]     (no STAGE: all, in this order)
#
# Stages (each runnable alone; those after `build` expect the extension built):
#   build           the C++ extension against the machine's own torch, no network:
#                   `pip install --no-build-isolation --no-deps -e .`, else `setup.py build_ext
#                   --inplace`, else g++ with the pybind11 headers that torch ships; then the
#                   import check and a first Triton launch on CUDA (Triton's launcher build)
#   numerics        benchmarks/check_numerics.py: every Triton kernel (paged decode, cascade
#                   decode, paged extend, merge, KV store, block copy, logsoftmax_topk,
#                   segmented top-k, sampling) in fp32 / fp16 / bf16 at real shapes against its
#                   torch reference; every case's errors -> numerics.json. The fp16/bf16
#                   tensor-core branch runs nowhere else (the CPU interpreter takes fp32).
#   tests           the tests marked `cuda` (tests/conftest.py: the kernel tests and the Triton
#                   backend's, on CUDA), in parallel shards (benchmarks/pytest_shards.py); pytest
#                   missing is recorded as "skipped (pytest not importable)", not a failure
#   bench_kernels   benchmarks/bench_kernels.py (bandwidth, cascade, top-k, sampling)
#   bench_host      benchmarks/bench_host.py --sizes 64 256 1024 (host time; the CPU of the machine)
#   bench_generate  benchmarks/bench_generate.py --device cuda --dtype bfloat16 --switches (also --overlap --cuda-graphs)
#   bench_search    benchmarks/bench_search.py --real-shapes at N = 16, 64, 256 (each capped alone)
#
# --dry-run: the same stages on the CPU (CUDA hidden), every shape tiny (`--smoke`), Triton
# kernels through TRITON_INTERPRET=1; the build stage only compiles into a temporary directory
# (nothing installed), one torch thread per process. 72 s on the 2-core CPU (up to 135 s while
# other jobs load it; its caps: a 170 s budget); tests/test_run_gpu_script.py runs it in CI.
#
# Results: $OUT (default ./gpu_out), at most 8 files: run_gpu.log (every stage's output, a header
# per stage, its exit status and seconds), summary.json (machine: nvidia-smi name / memory /
# driver, python / torch / triton / transformers versions; per stage: status, exit, seconds,
# cap; the tests' counts and failed ids), numerics.json, bench_kernels.json, bench_host.json,
# bench_generate.json, bench_search.json (N = 16 / 64 / 256 together). Exit status 0 when every
# stage passed (a tests stage skipped for lack of pytest included), 1 otherwise.
#
# Time caps on the H200: `timeout` per stage, each cut to what is left of a 350 s budget counted
# from the start (a stage with under 10 s left is skipped, and that is a failure). The estimates
# come from the CPU runs, the kernels' compile counts and the model sizes, not from a GPU (none
# has been lent yet): the first run's log gives each stage's real seconds, to tune these.
#   stage            cap   estimate  what takes the time
#   environment      20 s    6 s     imports torch / triton / transformers, CUDA init, nvidia-smi
#   build            45 s   25 s     three C++ files at -O3 (13 s on the 2-core CPU) + pip; Triton's
#                                    launcher build at the first CUDA launch (~5 s)
#   numerics         60 s   40 s     ~180 kernel compilations (CPU-bound) over 12 worker
#                                    processes; the cases themselves take milliseconds
#   tests            50 s   35 s     75 tests, ~80 kernel compilations, 8 shards (+ a collect pass)
#   bench_kernels    30 s   20 s     21 do_bench timings of ~0.4 s + ~10 compilations
#   bench_host       25 s   14 s     CPU only: 64 / 256 / 1,024 live sequences, two step settings
#                                    (14 s on 2 cores)
#   bench_generate   35 s   22 s     a random 4-layer Llama: 6 x (warm-up + 2) generations of 64 tokens
#                                    (plain, transformers, and with --overlap --cuda-graphs: graph
#                                    captures of up to 6 buckets)
#   bench_search    105 s   70 s     each N its own cap, 8 iterations each: N=16 40 s (4 problems;
#                                    it compiles the engine's kernels for both models), N=64 30 s
#                                    (4 problems), N=256 35 s (2 problems; pools of 24 + 48 GiB
#                                    hold both in flight); each builds a 1B policy + an 8B PRM (~8 s)
#   total           350 s ~233 s     the budget (caps sum to 370 s; the last stages get what is left)
#                                    + ~3 s of bookkeeping: under 6 minutes however the caps fall
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
PY=${PYTHON:-python3}
ALL_STAGES=(build numerics tests bench_kernels bench_host bench_generate bench_search)

# caps in seconds: real run / dry run
declare -A CAP=([build]=45 [numerics]=60 [tests]=50 [bench_kernels]=30 [bench_host]=25 [bench_generate]=35
                [bench_search]=105)
declare -A DRY_CAP=([build]=60 [numerics]=60 [tests]=60 [bench_kernels]=30 [bench_host]=30 [bench_generate]=30
                    [bench_search]=60)
SEARCH_NS=(16 64 256)
declare -A SEARCH_CAP=([16]=40 [64]=30 [256]=35)
declare -A SEARCH_ARGS=([16]="--problems 4 --iterations 8" [64]="--problems 4 --iterations 8"
                        [256]="--problems 2 --iterations 8 --kv-gb 24 --prm-kv-gb 48")
BUDGET=350 DRY_BUDGET=170 MIN_LEFT=10
ENV_CAP=20

now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ------------------------------------------------------------------------------------ the stages
# Each runs in a child bash (`run_gpu.sh __stage NAME`) under `timeout`, with RG_* set below.

stage_build() {
  cd "$REPO"
  local ext cxx
  ext=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cxx=${CXX:-$(command -v g++ || command -v c++ || command -v clang++ || echo g++)}
  cxx_build() {  # $1: output directory, $2: -O level. pybind11 from the headers torch ships: no package beyond torch
    local inc src pids=() objs=() pid
    mapfile -t inc < <("$PY" -c "import importlib.util, os, sysconfig  # torch's location without importing it
print(os.path.join(importlib.util.find_spec('torch').submodule_search_locations[0], 'include'))
print(sysconfig.get_paths()['include'])")
    mkdir -p "$RG_WORK/obj"
    for src in csrc/*.cpp; do  # every source of the extension, side by side
      objs+=("$RG_WORK/obj/$(basename "$src" .cpp).o")
      echo "+ $cxx $2 -c -fPIC -std=c++17 -fvisibility=hidden -Icsrc -I${inc[0]} -I${inc[1]} $src -o ${objs[-1]}"
      "$cxx" "$2" -c -fPIC -std=c++17 -fvisibility=hidden -Icsrc -I"${inc[0]}" -I"${inc[1]}" "$src" -o "${objs[-1]}" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || return 1; done
    echo "+ $cxx -shared ${objs[*]} -o $1/_C$ext"
    "$cxx" -shared "${objs[@]}" -o "$1/_C$ext"
  }
  have() { "$PY" -c "import $1" 2>/dev/null; }
  echo "build tools: pip $("$PY" -c "import pip; print(pip.__version__)" 2>/dev/null || echo absent)," \
       "setuptools $(have setuptools && echo yes || echo no), pybind11 $(have pybind11 && echo yes || echo no)," \
       "C++ compiler ${cxx}"
  if [ "$RG_DRY" = 1 ]; then
    # The real run tries pip, then setup.py (both need setuptools + pybind11), then the compiler
    # alone; the last is the one a machine with only torch / triton / transformers takes.
    echo "dry run: nothing installed; the compiler fallback at -O0 (quicker), into a temporary directory," \
         "then its module imported"
    mkdir -p "$RG_WORK/build"
    cxx_build "$RG_WORK/build" -O0 || return 1
    (cd "$RG_WORK/build" && "$PY" -c "import _C; print('the module built imports:', _C.BlockManager)") || return 1
  else
    export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    # ttc_fast.kernels is kernels/ (setup.py's package_dir): without an editable install, a link
    # gives the tree on PYTHONPATH the same layout (with one, it changes nothing)
    [ -e ttc_fast/kernels ] || { echo "+ ln -s ../kernels ttc_fast/kernels"; ln -s ../kernels ttc_fast/kernels; }
    imports() { "$PY" -c "import ttc_fast._C" 2>/dev/null; }
    echo "+ $PY -m pip install -q --no-build-isolation --no-deps -e ."
    if "$PY" -m pip install -q --no-build-isolation --no-deps -e . && imports; then
      echo "built: pip install -e ."
    else
      echo "+ $PY setup.py -q build_ext --inplace"
      if "$PY" setup.py -q build_ext --inplace && imports; then
        echo "built: setup.py build_ext --inplace"
      else
        cxx_build ttc_fast -O3 || return 1
        echo "built: $cxx with torch's pybind11 headers"
      fi
    fi
  fi
  # The package imports from this tree, and a first Triton launch on CUDA.
  "$PY" - <<'EOF'
import torch
import ttc_fast
import ttc_fast._C
import ttc_fast.kernels as K
print("import ok:", ttc_fast.__file__, ttc_fast._C.__file__, K.__file__)
if torch.cuda.is_available():  # the first Triton launch builds Triton's launcher: once here, not in every worker
    kv = torch.randn(1, 2, 4, 16, 2, 64, device="cuda")
    K.copy_blocks(kv, torch.tensor([[0, 1]], dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(kv[:, :, 1], kv[:, :, 0])
    print("first Triton launch on CUDA ok")
EOF
}

stage_numerics() {
  cd "$REPO"
  if [ "$RG_DRY" = 1 ]; then
    "$PY" benchmarks/check_numerics.py --smoke --json "$RG_OUT/numerics.json"
  else
    "$PY" benchmarks/check_numerics.py --json "$RG_OUT/numerics.json"
  fi
}

stage_tests() {
  cd "$REPO"
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not importable on this machine: the CUDA tests did not run (recorded as skipped)"
    echo '{"status": "pytest not importable", "rc": 3}' > "$RG_WORK/tests.json"
    return 3
  fi
  local files
  files=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')
  echo "files with tests marked cuda: $files"
  if [ "$RG_DRY" = 1 ]; then
    "$PY" benchmarks/pytest_shards.py --jobs 1 --json "$RG_WORK/tests.json" -- -m "cuda and not slow" $files
  else
    "$PY" benchmarks/pytest_shards.py --jobs 8 --json "$RG_WORK/tests.json" -- -m cuda $files
  fi
}

stage_bench_kernels() {
  cd "$REPO"
  "$PY" benchmarks/bench_kernels.py $([ "$RG_DRY" = 1 ] && echo --smoke) --json "$RG_OUT/bench_kernels.json"
}

stage_bench_host() {
  cd "$REPO"
  if [ "$RG_DRY" = 1 ]; then
    "$PY" benchmarks/bench_host.py --smoke --json "$RG_OUT/bench_host.json"
  else
    "$PY" benchmarks/bench_host.py --sizes 64 256 1024 --json "$RG_OUT/bench_host.json"
  fi
}

stage_bench_generate() {
  cd "$REPO"
  if [ "$RG_DRY" = 1 ]; then
    "$PY" benchmarks/bench_generate.py --smoke --switches --device cpu --json "$RG_OUT/bench_generate.json"
  else
    "$PY" benchmarks/bench_generate.py --device cuda --dtype bfloat16 --repeats 2 --switches --json "$RG_OUT/bench_generate.json"
  fi
}

stage_bench_search() {
  cd "$REPO"
  local n cap left rc t0 args status=0 runs=()
  for n in "${SEARCH_NS[@]}"; do
    if [ "$RG_DRY" = 1 ]; then
      cap=20; args="--smoke"
    else
      cap=${SEARCH_CAP[$n]}; args=${SEARCH_ARGS[$n]}
    fi
    left=$(awk -v d="$RG_DEADLINE" -v t="$(now)" 'BEGIN { printf "%d", d - t }')
    [ "$left" -lt "$cap" ] && cap=$left
    echo "----- bench_search --real-shapes --n $n $args (cap ${cap} s) -----"
    t0=$(now)
    if [ "$cap" -lt 5 ]; then
      rc=124; echo "no time left"
    else
      # --foreground: stays in the stage's process group, so the stage's own cap still reaches it
      timeout --foreground -k 5 "$cap" "$PY" benchmarks/bench_search.py --real-shapes --n "$n" $args \
        --json "$RG_WORK/search_n$n.json"
      rc=$?
    fi
    echo "----- N=$n: exit $rc in $(secs_since "$t0") s -----"
    runs+=("$n:$rc:$(secs_since "$t0"):$cap")
    [ "$rc" = 0 ] || status=1
  done
  "$PY" - "$RG_WORK" "$RG_OUT/bench_search.json" "${runs[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, out, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
merged = {}
for r in runs:
    n, rc, secs, cap = r.split(":")
    p = work / f"search_n{n}.json"
    entry = {"exit": int(rc), "status": "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else "failed"),
             "seconds": float(secs), "cap_s": int(cap)}
    if p.is_file():
        entry["result"] = json.loads(p.read_text())
    merged[f"N={n}"] = entry
Path(out).write_text(json.dumps(merged, indent=1))
print("wrote", out)
EOF
  return $status
}

if [ "${1:-}" = __stage ]; then
  "stage_$2"
  exit $?
fi

# ------------------------------------------------------------------------------------ the driver
DRY=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *)
      if [[ " ${ALL_STAGES[*]} " == *" $a "* ]]; then STAGES+=("$a")
      else echo "unknown stage or option: $a (stages: ${ALL_STAGES[*]}; option: --dry-run)" >&2; exit 2; fi ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")

OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/run_gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/run_gpu.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this tree, whatever is installed
export RG_DRY=$DRY RG_OUT=$OUT_DIR RG_WORK=$WORK PYTHON=$PY
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
  # one thread per process: nothing is measured, and a busy CPU does not slow it down many-fold
  export OMP_NUM_THREADS=1
  budget=$DRY_BUDGET
else
  budget=$BUDGET
fi
T0=$(now)
export RG_DEADLINE=$(awk -v t="$T0" -v b="$budget" 'BEGIN { printf "%.0f", t + b }')

log() { echo "$@" | tee -a "$LOG"; }

write_summary() {
  "$PY" - "$WORK" "$OUT_DIR/summary.json" "$DRY" "$(secs_since "$T0")" <<'EOF'
import json, sys
from pathlib import Path
work, out, dry, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
stages = []
if (work / "stages.tsv").is_file():
    for ln in (work / "stages.tsv").read_text().splitlines():
        name, status, rc, secs, cap = ln.split("\t")
        stages.append({"stage": name, "status": status, "exit": int(rc), "seconds": float(secs), "cap_s": int(cap)})
summary = {"dry_run": dry, "total_seconds": total, "environment": env, "stages": stages}
if (work / "tests.json").is_file():
    summary["tests"] = json.loads((work / "tests.json").read_text())
num = Path(out).parent / "numerics.json"
if num.is_file():
    try:
        n = json.loads(num.read_text())
        summary["numerics"] = {"cases": n["info"]["cases"], "failed": n["failed"]}
    except (ValueError, KeyError):
        pass
summary["ok"] = all(s["status"] in ("ok", "skipped (pytest not importable)") for s in stages)
Path(out).write_text(json.dumps(summary, indent=1))
EOF
}

{
  echo "===== run_gpu.sh $([ "$DRY" = 1 ] && echo "--dry-run ")${STAGES[*]} ($(date -u +%FT%TZ)) ====="
  echo "repo $REPO, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), OUT $OUT_DIR"
  echo "===== environment ====="
  if command -v nvidia-smi >/dev/null; then
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else
    echo "nvidia-smi: not found"
  fi
} 2>&1 | tee -a "$LOG"
timeout "$ENV_CAP" "$PY" - "$WORK/env.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, platform, shutil, subprocess, sys
env = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
       "cpu_count": os.cpu_count(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
for mod in ("torch", "triton", "transformers", "pytest"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        env[mod] = f"not importable: {type(e).__name__}: {e}"
if shutil.which("nvidia-smi"):
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        env["nvidia_smi"] = [dict(zip(("name", "memory_total", "driver"), (x.strip() for x in ln.split(","))))
                             for ln in q.splitlines()]
    except Exception as e:  # noqa: BLE001
        env["nvidia_smi"] = f"failed: {e}"
else:
    env["nvidia_smi"] = None
try:
    import torch
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1),
                    "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count, "cuda": torch.version.cuda})
except Exception as e:  # noqa: BLE001
    env["cuda_available"] = f"failed: {e}"
for k, v in env.items():
    print(f"{k}: {v}")
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=1)
EOF

failed=0
i=0
for st in "${STAGES[@]}"; do
  i=$((i + 1))
  if [ "$DRY" = 1 ]; then cap=${DRY_CAP[$st]}; else cap=${CAP[$st]}; fi
  left=$(awk -v d="$RG_DEADLINE" -v t="$(now)" 'BEGIN { printf "%d", d - t }')
  [ "$left" -lt "$cap" ] && cap=$left
  log ""
  log "===== [$i/${#STAGES[@]}] $st (cap ${cap} s, $(secs_since "$T0") s into the run) ====="
  t0=$(now)
  if [ "$cap" -lt "$MIN_LEFT" ]; then
    rc=125; status="skipped (time budget)"
    log "not run: ${left} s left of the ${budget} s budget"
  else
    timeout -k 5 "$cap" bash "$SELF" __stage "$st" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status=ok ;;
      3) if [ "$st" = tests ]; then status="skipped (pytest not importable)"; else status=failed; fi ;;
      124|137) status="timeout (${cap} s)" ;;
      *) status=failed ;;
    esac
  fi
  secs=$(secs_since "$t0")
  log "===== $st: $status, exit $rc, ${secs} s ====="
  printf '%s\t%s\t%s\t%s\t%s\n' "$st" "$status" "$rc" "$secs" "$cap" >> "$WORK/stages.tsv"
  case $status in ok|"skipped (pytest not importable)") ;; *) failed=1 ;; esac
  write_summary
done

log ""
log "===== summary ($(secs_since "$T0") s) ====="
column -t -s $'\t' "$WORK/stages.tsv" 2>/dev/null | tee -a "$LOG" || tee -a "$LOG" < "$WORK/stages.tsv"
write_summary
log "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit $failed
