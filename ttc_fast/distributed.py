"""Data-parallel search over Ray actors: ``ttc-fast run ... --workers K [--ray-address ADDR]``.

Each actor holds its own engine and verifier (a GPU each, `num_gpus=1`; CPU actors where there is
no GPU) and searches problems it pulls from the driver's work queue, as many at once as its pools
(or --max-in-flight) allow, batched together as in one process; it pulls more as problems finish,
so a long problem does not hold up a fixed chunk. Each finished problem streams back to the
driver, which writes OUT as lines arrive. A problem keeps its position in the data file, which
seeds its sampling: the results do not depend on K or on who ran what. A worker that dies loses
nothing finished: the problems it had claimed and not finished go back on the queue; `--resume`
works as in one process. A worker that cannot start (a model missing on its node, out of GPU
memory) stops the run with its error.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from .results import RunError, append_line

STOP = None  # the work queue's end: one per worker


@dataclass
class WorkerSpec:
    """Everything an actor needs to build its models and search like the driver's process would."""

    policy: str
    prm: str | None
    device: str | None
    dtype: str | None
    engine_options: dict
    prm_kind: str | None
    prm_options: dict
    strategy: object
    sampling: object
    prompt: dict  # system_prompt, chat_template, chat_template_kwargs
    models: dict | None
    max_in_flight: int | None = None
    gpus: float = 0.0
    env: dict = field(default_factory=dict)
    # CUDA without pool sizes: (utilization, prm_kv_fraction, path tokens, profile blocks), the
    # joint plan of `memory_plan.plan_device_memory`, made on each worker's GPU
    memory_plan: tuple | None = None


class _Pulls:
    """The search's source inside a worker: problems pulled from the driver's queue when the
    search has room, each claimed (told to the driver) as it is taken."""

    def __init__(self, first, work, results, wid):
        from ray.util.queue import Empty

        self.buf, self.work, self.results, self.wid = deque(), work, results, wid
        self.ended, self._empty = False, Empty
        self._take(first)

    def _take(self, item) -> None:
        if item is STOP:
            self.ended = True
            return
        self.results.put(("claim", self.wid, item[0], None))
        self.buf.append(item)

    def __bool__(self) -> bool:
        if not self.buf and not self.ended:
            try:
                self._take(self.work.get_nowait())
            except self._empty:
                pass
        return bool(self.buf)

    def popleft(self):
        return self.buf.popleft()


class SearchWorker:
    """A Ray actor's body: its own engine and verifier."""

    def __init__(self, spec: WorkerSpec):
        import ttc_fast as tf

        from .run import resolve_prm

        self.spec = spec
        plan = spec.memory_plan
        profile = {"num_blocks": plan[3]} if plan is not None else {}
        model = tf.load_model(spec.policy, device=spec.device, dtype=spec.dtype)
        self.engine = tf.Engine(model, **spec.engine_options, **profile)
        prm_pool = profile or {"kv_cache_bytes": spec.prm_options.get("kv_cache_bytes")}
        options = {k: v for k, v in spec.prm_options.items() if k != "kv_cache_bytes"}
        self.prm = (resolve_prm(spec.prm, kind=spec.prm_kind, device=spec.device, dtype=spec.dtype,
                                block_size=spec.engine_options.get("block_size", 16),
                                backend=spec.engine_options.get("backend", "auto"), **prm_pool, **options)
                    if spec.prm is not None else None)
        if plan is not None:
            from .memory_plan import plan_device_memory

            plan_device_memory(self.engine, self.prm, plan[0], plan[1], path_tokens=min(plan[2], model.config.max_context))

    def pid(self) -> int:
        return os.getpid()

    def models(self) -> dict:
        """The identity its lines record (`identity.run_models`): also proves it started."""
        from .identity import run_models

        return run_models(self.engine.model, self.prm, self.spec.prm)

    def run(self, work, results, wid: int, models: dict | None) -> int:
        """Search pulled problems until the driver's STOP; returns how many it finished. Lines
        record `models` (the driver's, from its first worker)."""
        from .prompts import PromptFormat
        from .results import result_to_record
        from .search import TreeSearch

        spec = self.spec
        prompt = PromptFormat(spec.prompt["system_prompt"], spec.prompt["chat_template"], spec.prompt["chat_template_kwargs"])
        search = TreeSearch(self.engine, self.prm, spec.strategy, spec.sampling, system_prompt=prompt.system_prompt,
                            max_problems_in_flight=spec.max_in_flight, chat_template=prompt.chat_template,
                            chat_template_kwargs=prompt.chat_template_kwargs)
        finished = 0
        while True:
            source = _Pulls(work.get(block=True), work, results, wid)
            for result, problem in search.run_source(source):
                record = result_to_record(result, spec.strategy, spec.sampling, prompt, models)
                results.put(("result", wid, None, record))
                finished += 1
            if source.ended:
                return finished


def _ray():
    try:
        import ray
    except ImportError:
        from .loader import MissingExtra

        raise MissingExtra('--workers runs on Ray, which is not installed: pip install "ttc_fast[ray]"') from None
    return ray


def run_distributed(spec: WorkerSpec, workers: int, problems, out_path, tokenizer, model_path, resume=False,
                    overwrite=False, positions=None, ray_address=None, progress=True, on_result=None):
    """`run.run_search`'s job on `workers` Ray actors (see the module docstring); returns a
    RunOutcome. `tokenizer`, `model_path`: the policy's, to check the prompt before starting; the
    lines record the models' identity as the workers loaded them. `on_result(record, pids)`:
    called on the driver after each line is written, with the workers' process ids (tests)."""
    from .run import RunOutcome, _Progress, open_run

    if workers < 1:
        raise RunError(f"--workers must be >= 1, got {workers}")
    ray = _ray()
    prompt_settings = spec.prompt
    if not ray.is_initialized():
        # A local instance: the workers import this process's modules (a python: verifier too).
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)), **spec.env}
        ray.init(address=ray_address, runtime_env={"env_vars": env} if ray_address is None else None,
                 include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": max(workers + 1, os.cpu_count() or 1)} if ray_address is None else {}))
    actor_class = ray.remote(SearchWorker).options(num_gpus=spec.gpus, num_cpus=1, max_restarts=0)
    actors = {wid: actor_class.remote(spec) for wid in range(workers)}
    try:
        identities = ray.get([a.models.remote() for a in actors.values()])
        pids = dict(zip(actors, ray.get([a.pid.remote() for a in actors.values()])))
    except Exception as e:  # a worker could not start: its error, not a hang
        for actor in actors.values():
            ray.kill(actor)
        raise RunError(f"a worker could not start: {_cause(e)}") from None
    spec.models = identities[0]
    out_path, _, previous, todo = open_run(tokenizer, model_path, spec.prm is not None, spec.strategy, spec.sampling,
                                           problems, out_path, resume, overwrite, prompt_settings["system_prompt"],
                                           prompt_settings["chat_template"], prompt_settings["chat_template_kwargs"],
                                           positions, spec.models)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records, start = list(previous), time.perf_counter()
    bar = _Progress(len(problems), len(problems) - len(todo), progress)
    from ray.util.queue import Empty, Queue

    work, results = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    if todo:
        work.put_nowait_batch([(i, p) for i, p in todo])
    runs = {actors[wid].run.remote(work, results, wid, spec.models): wid for wid in range(workers)}
    claimed = {wid: set() for wid in range(workers)}
    done: set[int] = set()
    id_position = {p.id: i for i, p in todo}
    try:
        with open(out_path, "a" if resume else "w", encoding="utf-8") as f:
            while len(done) < len(todo):
                try:
                    kind, wid, position, record = results.get(timeout=0.2)
                except Empty:
                    kind = None
                if kind == "claim" and wid in claimed:  # (a dead worker's messages may still arrive)
                    claimed[wid].add(position)
                elif kind == "result":
                    position = id_position[record["id"]]
                    claimed.get(wid, set()).discard(position)
                    if position not in done:  # a re-queued problem may finish twice
                        done.add(position)
                        append_line(f, record)
                        records.append(record)
                        bar.update(record["policy_tokens"])
                        if on_result is not None:
                            on_result(record, pids)
                if kind is None or not len(runs):
                    _reap(ray, runs, claimed, done, work, todo)
        for _ in runs:
            work.put(STOP)
        ray.wait(list(runs), num_returns=len(runs), timeout=30)  # then killed below, done or not
    finally:
        bar.close()
        for actor in actors.values():
            ray.kill(actor)
        for q in (work, results):
            q.shutdown()
    return RunOutcome(records, records[len(previous):], time.perf_counter() - start)


def _cause(error: Exception) -> str:
    """The last line of a Ray error's text: the exception raised in the worker."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _reap(ray, runs, claimed, done, work, todo) -> None:
    """Workers that ended: a failure puts its unfinished claims back on the queue; none left with
    problems unfinished stops the run (rerun with --resume: nothing finished is lost)."""
    ready, _ = ray.wait(list(runs), timeout=0)
    by_position = dict(todo)
    for ref in ready:
        wid = runs.pop(ref)
        try:
            ray.get(ref)
            continue
        except Exception as e:  # the actor died, or could not start
            error = e
        claimed.pop(wid, None)
        if not runs:
            raise RunError(f"worker {wid} died ({type(error).__name__}) and no worker is left: "
                           f"{len(todo) - len(done)} problems unfinished; rerun with --resume") from None
        # Every problem neither finished nor claimed by a live worker goes back on the queue: the
        # dead one may have taken one without its claim arriving. A problem queued twice is
        # searched twice at worst, and written once.
        live = set().union(*claimed.values())
        for position in sorted(set(by_position) - done - live):
            work.put((position, by_position[position]))
