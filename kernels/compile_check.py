"""Ahead-of-time compile checks of every Triton kernel for real GPUs, on a machine without one.

Each case compiles one kernel for one target (sm_90, sm_80, sm_89) and dtype at the launch
configuration its launcher really uses (the launchers' `*_launch_config` functions, given the
target explicitly), with arguments specialised the way Triton's JIT specialises a launch on a
model's tensors. ptxas (shipped in the triton wheel) reports registers, spill bytes and stack
frame per thread; the compiled kernel's metadata gives its shared memory per block. A case fails
on a compile error, on shared memory over the target's limit, or on any register spill (in the
attention kernels' fp32 paths: more than SPILL_LIMIT_FP32_DOT bytes per thread).

Compiles must not run under TRITON_INTERPRET=1 (the kernels would be interpreter objects), so
`CompilePool` runs them in worker processes without it, on a fresh Triton cache that is deleted
afterwards (no result carries over from an earlier run). `python -m ttc_fast.kernels.compile_check
[--full] [--jobs N] [--kernel NAME]` prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .common import GpuTarget, gpu_target, interpreting

TARGETS = {"sm_90": gpu_target(90), "sm_80": gpu_target(80), "sm_89": gpu_target(89)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Spill allowed per thread: none, except in the attention kernels' fp32 paths (FP32_DOT), whose
# dots run on CUDA cores with whole tiles in registers: there a little is tolerated.
SPILL_LIMIT_FP32_DOT = 1024
# The model shapes the cases use: KV heads, cache block size, block-table width, vocabulary.
NUM_KV_HEADS = 8
BLOCK_SIZE = 16
TABLE_WIDTH = 1000
VOCAB = 128256
NUM_SPLITS = 8  # any split count > 1: it is a runtime integer, not a constexpr
# Quick set: one model shape per head_dim (Llama-3.2-1B: 32 q / 8 kv heads of 64; Llama-3.1-70B:
# 64 q / 8 kv heads of 128); the full set adds every GQA group of GROUPS and fp16.
QUICK_SHAPES = ((64, 4), (128, 8))
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)
# k of segmented_topk: what the search keeps per pruning group (n / width, or 1 for DVTS);
# k of logsoftmax_topk: a beam's candidates, up to its MAX_K.
SEGMENTED_KS = (1, 4, 16, 64, 256)
LSM_KS = (8, 64, 256, 512, 1024)
QUICK_SEGMENTED_KS = (64,)
QUICK_LSM_KS = (8, 1024)

# kernels whose cases vary with (head_dim, group), with head_dim only, with k
ATTENTION = ("paged_decode", "paged_decode_split", "cascade_suffix", "cascade_prefix", "paged_extend")
PER_HEAD_DIM = ("merge_splits", "merge_states", "store_kv", "copy_blocks")
FP32_ONLY = ("segmented_topk", "lsm_topk_reduce")  # their inputs are fp32 whatever the model's dtype


@dataclass(frozen=True)
class Case:
    kernel: str  # one of KERNELS
    target: str  # a key of TARGETS
    dtype: str  # a key of DTYPES: the model's (cache / logits) dtype
    head_dim: int = 0
    group: int = 0  # GQA group: q heads per kv head
    k: int = 0

    @property
    def name(self) -> str:
        parts = [self.kernel, self.target, self.dtype]
        parts += [f"d{self.head_dim}"] if self.head_dim else []
        parts += [f"g{self.group}"] if self.group else []
        parts += [f"k{self.k}"] if self.k else []
        return "-".join(parts)

    @classmethod
    def from_name(cls, name: str) -> "Case":
        kernel, target, dtype, *rest = name.split("-")
        dims = {"d": "head_dim", "g": "group", "k": "k"}
        return cls(kernel, target, dtype, **{dims[p[0]]: int(p[1:]) for p in rest})


@dataclass
class Usage:
    """What one compile used, per thread (registers, spill, stack) and per block (shared)."""
    config: dict = field(default_factory=dict)
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0  # compile time, ptxas included
    error: str = ""


def _attention_cases(kernels, targets, dtypes, shapes):
    return [Case(kern, t, dt, d, g) for kern in kernels for t in targets for dt in dtypes for d, g in shapes]


def _other_cases(targets, dtypes, head_dims, seg_ks, lsm_ks):
    cases = [Case(kern, t, dt, d) for kern in PER_HEAD_DIM for t in targets for dt in dtypes for d in head_dims]
    cases += [Case("sample", t, dt) for t in targets for dt in dtypes]
    cases += [Case("segmented_topk", t, "fp32", k=k) for t in targets for k in seg_ks]
    cases += [Case("lsm_topk_tile", t, dt, k=k) for t in targets for dt in dtypes for k in lsm_ks]
    cases += [Case("lsm_topk_reduce", t, "fp32", k=k) for t in targets for k in lsm_ks]
    return cases


def quick_cases() -> list[Case]:
    """One model shape per head_dim, bf16 and fp32, every target: the default test set."""
    dtypes = ("bf16", "fp32")
    # paged_decode_split is the same kernel as cascade_suffix but for its start offset: full set only
    attention = [k for k in ATTENTION if k != "paged_decode_split"]
    return (_attention_cases(attention, TARGETS, dtypes, QUICK_SHAPES)
            + _other_cases(TARGETS, dtypes, HEAD_DIMS, QUICK_SEGMENTED_KS, QUICK_LSM_KS))


def full_cases() -> list[Case]:
    """Every kernel x target x dtype x head_dim x GQA group x k (the quick cases included)."""
    shapes = [(d, g) for d in HEAD_DIMS for g in GROUPS]
    return _attention_cases(ATTENTION, TARGETS, DTYPES, shapes) + _other_cases(TARGETS, DTYPES, HEAD_DIMS, SEGMENTED_KS, LSM_KS)


def problems(case: Case, usage: Usage) -> list[str]:
    """Why this case fails the check (empty when it passes)."""
    where = f"{case.kernel} on {case.target}, {case.dtype}, config {usage.config}"
    if usage.error:
        return [f"{where}: compile failed:\n{usage.error}"]
    found = []
    limit = TARGETS[case.target].max_shared
    if usage.shared > limit:
        found.append(f"{where}: {usage.shared:,} bytes of shared memory per block, over {case.target}'s "
                     f"{limit:,}")
    spill_limit = SPILL_LIMIT_FP32_DOT if usage.config.get("FP32_DOT") else 0
    spill = max(usage.spill_stores, usage.spill_loads)
    if spill > spill_limit:
        found.append(f"{where}: spills {usage.spill_stores:,} bytes stored / {usage.spill_loads:,} loaded per thread "
                     f"(limit {spill_limit:,}; {usage.registers} registers, {usage.stack:,} bytes stack frame)")
    return found


# ---------------------------------------------------------------------------------------------
# Kernel arguments: pointers as dtypes, integers as a model's strides and sizes, so that Triton's
# own specialisation (16-divisible integers, integers equal to 1) matches a real launch.
# ---------------------------------------------------------------------------------------------
def _strides(*shape: int) -> list[int]:
    out = [1]
    for n in reversed(shape[1:]):
        out.insert(0, out[0] * n)
    return out


def _kernel_launch(case: Case, target: GpuTarget):
    """(jit function, positional arguments, launch config) of one case."""
    from . import beam_topk, block_copy, cascade_decode, kv_store, paged_decode, paged_extend, sampling

    dt = DTYPES[case.dtype]
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    D, hkv = case.head_dim, NUM_KV_HEADS
    hq = hkv * (case.group or 1)
    cache = _strides(TABLE_WIDTH, BLOCK_SIZE, hkv, D)[:3] if D else []
    scale_log2 = 0.18
    kern = case.kernel
    if kern in ("paged_decode", "paged_decode_split", "cascade_suffix"):
        # one split writes q's dtype; several write fp32 partials (the cascade's suffix always
        # asks for the lse, and starts at each row's prefix length)
        split = kern != "paged_decode"
        splits = NUM_SPLITS if split else 1
        o = _strides(1, hq, splits, D)[:3] if split else _strides(1, hq, D)[:2] + [0]
        lse = _strides(1, hq, splits)[:3] if split else _strides(1, hq)[:2] + [0]
        args = [dt, dt, dt, i32, i32, i32, f32 if split else dt, f32, *_strides(1, hq, D)[:2], *cache, *cache,
                TABLE_WIDTH, *o, *lse, scale_log2, splits]
        cfg = paged_decode.decode_launch_config(dt, D, case.group, BLOCK_SIZE, kern == "cascade_suffix", target)
        return paged_decode._paged_decode_kernel, args, cfg
    if kern == "cascade_prefix":
        args = [dt, dt, dt, i32, i32, i32, f32, f32, *_strides(1, hq, D)[:2], *cache, *cache, TABLE_WIDTH,
                *_strides(1, hq, NUM_SPLITS, D)[:3], *_strides(1, hq, NUM_SPLITS), scale_log2, NUM_SPLITS]
        cfg = cascade_decode.prefix_launch_config(dt, D, case.group, BLOCK_SIZE, target)
        return cascade_decode._prefix_attn_kernel, args, cfg
    if kern == "paged_extend":
        args = [dt, dt, dt, dt, i32, i32, i32, *_strides(1, hq, D)[:2], *cache, *cache, *_strides(1, hq, D)[:2],
                TABLE_WIDTH, scale_log2]
        cfg = paged_extend.extend_launch_config(dt, D, case.group, BLOCK_SIZE, target)
        return paged_extend._paged_extend_kernel, args, cfg
    if kern == "merge_splits":  # the most splits decode uses, into the model's dtype
        splits = paged_decode.MAX_SPLITS
        args = [f32, f32, dt, f32, *_strides(1, hq, splits, D)[:3], *_strides(1, hq, splits)[:2],
                *_strides(1, hq, D)[:2], hq, splits]
        return paged_decode._merge_splits_kernel, args, paged_decode.merge_splits_launch_config(hq, D, splits, True)
    if kern == "merge_states":  # the cascade's fp32 prefix state with its suffix state
        o, lse = _strides(1, hq, D)[:2], _strides(1, hq)
        args = [f32, f32, dt, f32, dt, f32, *o, *lse, *o, *lse, *o, *lse]
        return cascade_decode._merge_states_kernel, args, cascade_decode.merge_states_launch_config(D)
    if kern == "store_kv":  # k after rotary (contiguous), v a view of the fused qkv projection
        qkv = (hq + 2 * hkv) * D
        args = [dt, dt, dt, dt, i32, *_strides(1, hkv, D), qkv, D, 1, *cache, *cache]
        return kv_store._store_kv_kernel, args, kv_store.store_kv_launch_config(hkv, D, BLOCK_SIZE)
    if kern == "copy_blocks":
        kv = _strides(32, 2, TABLE_WIDTH, BLOCK_SIZE, hkv, D)
        cfg = block_copy.copy_blocks_launch_config(BLOCK_SIZE * hkv * D, target)
        return block_copy._copy_blocks_kernel, [dt, i32, *kv[:3]], cfg
    if kern == "sample":
        args = [dt, f32, i32, f32, i64, i64, i64, VOCAB, VOCAB]
        return sampling._sample_kernel, args, sampling.sample_launch_config(VOCAB, target)
    if kern == "segmented_topk":  # the search passes no parents
        args = [f32, i32, i32, f32, i32, i32]
        return beam_topk._segmented_topk_kernel, args, beam_topk.segmented_topk_launch_config(case.k, False, target)
    if kern in ("lsm_topk_tile", "lsm_topk_reduce"):
        tile_cfg, reduce_cfg = beam_topk.lsm_topk_launch_configs(VOCAB, case.k, target)
        num_tiles = -(-VOCAB // tile_cfg["TILE"])
        if kern == "lsm_topk_tile":
            return beam_topk._lsm_topk_tile_kernel, [dt, f32, i64, VOCAB, VOCAB, num_tiles], tile_cfg
        return beam_topk._lsm_topk_reduce_kernel, [f32, i64, f32, f32, i32, num_tiles], reduce_cfg
    raise ValueError(f"unknown kernel {kern!r} in case {case.name}")


KERNELS = ATTENTION + PER_HEAD_DIM + ("sample", "segmented_topk", "lsm_topk_tile", "lsm_topk_reduce")
_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path() -> str:
    from triton import knobs

    try:
        return knobs.nvidia.ptxas.path
    except RuntimeError as e:
        raise RuntimeError(
            f"compile check: {e}. The triton wheel ships ptxas as triton/backends/nvidia/bin/ptxas: reinstall "
            "triton (pip install --force-reinstall triton), or point TRITON_PTXAS_PATH at a CUDA 12.8+ ptxas") from e


def compile_case(case: Case) -> Usage:
    """Compile one case in this process (which must not be interpreting Triton) and read its usage."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget as TritonTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    if interpreting():
        raise RuntimeError("compile_case: TRITON_INTERPRET is set, so the kernels are interpreter objects; "
                           "use CompilePool, which compiles in processes without it")
    ptxas_path()
    target = TARGETS[case.target]
    fn, args, config = _kernel_launch(case, target)
    usage = Usage(config=config)
    start = time.perf_counter()
    try:
        # Triton's own launch path: bind and specialise the arguments, then compile for the target.
        backend = make_backend(TritonTarget("cuda", target.capability, 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in args]
        bound, spec, options = binder(*args, **config)
        options, signature, constexprs, attrs = fn._pack_args(backend, config, bound, spec, options)
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton's own ptxas call
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target,
                                      options=options.__dict__)
    except Exception:
        usage.error = traceback.format_exc(limit=-4)
        return usage
    usage.seconds = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    found, regs = _PTXAS_USAGE.search(text), _PTXAS_REGS.search(text)
    if not (found and regs):
        usage.error = f"no resource usage in the ptxas report:\n{text}"
        return usage
    usage.stack, usage.spill_stores, usage.spill_loads = map(int, found.groups())
    usage.registers = int(regs.group(1))
    usage.shared = int(compiled.metadata.shared)
    return usage


def _serve() -> None:
    """Worker loop: a case name per line on stdin, its Usage as one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the replies
    for line in sys.stdin:
        name = line.strip()
        try:
            usage = compile_case(Case.from_name(name))
        except Exception:
            usage = Usage(error=traceback.format_exc())
        out.write(json.dumps(asdict(usage)) + "\n")
        out.flush()


class CompilePool:
    """Compiles cases in `jobs` worker processes (without TRITON_INTERPRET, with a fresh Triton
    cache); `submit` queues cases ahead, `result` waits for one."""

    def __init__(self, jobs: int = 2):
        self._dir = tempfile.TemporaryDirectory(prefix="ttc_compile_check_")
        self._env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self._env.update(TRITON_CACHE_DIR=os.path.join(self._dir.name, "cache"), TRITON_ALWAYS_COMPILE="1")
        self._queue: queue.Queue = queue.Queue()
        self._done: dict[Case, threading.Event] = {}
        self._results: dict[Case, Usage] = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(max(1, jobs))]
        for t in self._threads:
            t.start()

    def _start_worker(self, i: int):
        log = open(os.path.join(self._dir.name, f"worker{i}.log"), "a")
        # the worker resolves imports on this process's sys.path, so it compiles the same kernels
        module = __spec__.name if __spec__ else "ttc_fast.kernels.compile_check"
        boot = ("import json, runpy, sys; sys.path[:] = json.loads(sys.argv[1]); sys.argv[1:] = ['--serve']; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        return subprocess.Popen([sys.executable, "-c", boot, json.dumps(sys.path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, env=self._env, text=True), log

    def _ask(self, proc, log, case: Case) -> Usage:
        try:
            proc.stdin.write(case.name + "\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
        except OSError:
            reply = ""
        if reply:
            return Usage(**json.loads(reply))
        proc.wait()
        log.flush()
        with open(log.name) as f:
            tail = f.read()[-4000:]
        return Usage(error=f"compile worker exited with {proc.returncode}:\n{tail}")

    def _work(self, i: int) -> None:
        proc, log = None, None
        while (case := self._queue.get()) is not None:
            try:
                if proc is None:
                    proc, log = self._start_worker(i)
                usage = self._ask(proc, log, case)
            except Exception:  # a waiting test must get an answer, never hang
                usage = Usage(error=traceback.format_exc())
            if proc is not None and proc.poll() is not None:  # it died: the next case starts another
                log.close()
                proc = None
            self._results[case] = usage
            self._done[case].set()
        if proc is not None:
            proc.stdin.close()
            proc.wait()
            log.close()

    def submit(self, cases) -> None:
        with self._lock:
            for case in cases:
                if case not in self._done:
                    self._done[case] = threading.Event()
                    self._queue.put(case)

    def result(self, case: Case) -> Usage:
        self.submit([case])
        self._done[case].wait()
        return self._results[case]

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._dir.cleanup()


def _table(rows) -> str:
    head = f"{'case':44} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>7} {'shared':>8} {'secs':>5}  verdict"
    lines = [head]
    for case, usage in rows:
        verdict = "FAIL" if problems(case, usage) else "ok"
        if usage.error:
            lines.append(f"{case.name:44} compile error")
            continue
        lines.append(f"{case.name:44} {usage.registers:5d} {usage.spill_stores:9,d} {usage.spill_loads:9,d} "
                     f"{usage.stack:7,d} {usage.shared:8,d} {usage.seconds:5.1f}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every case (default: the quick set)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        _serve()
        return 0
    cases = full_cases() if a.full else quick_cases()
    if a.kernel:
        cases = [c for c in cases if c.kernel in a.kernel]
    pool = CompilePool(a.jobs)
    try:
        pool.submit(cases)
        rows = [(c, pool.result(c)) for c in cases]
    finally:
        pool.close()
    print(_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"case": c.name, **asdict(u)} for c, u in rows], f, indent=1)
    failed = [msg for c, u in rows for msg in problems(c, u)]
    print("\n".join(failed) if failed else f"all {len(rows)} cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
