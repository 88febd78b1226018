"""Process reward models (PRMs): step scores for search.

    prm = load_prm("path/to/Qwen2.5-Math-PRM-7B", kind="qwen-prm")
    h = prm.start(question); beams = prm.fork(h, 4); prm.free(h)
    scores = prm.score_steps(beams, steps)  # one new step per handle, ONE batched forward

`formats`: the published PRMs' token layouts, heads and read-outs (`make_format`, `FORMATS`);
`base`: the verifier interface; `scorer`: a PRM checkpoint in its own prefix-shared paged
cache, scoring only new step tokens (`ModelPRM`); `callable`: Python verifiers (`CallablePRM`);
`loading`: `load_prm`.
"""
from ..scores import AGGREGATIONS, aggregate
from .formats import FORMATS, KINDS, MATH_SHEPHERD_LAYOUTS, QWEN_PRM_SYSTEM, Format, make_format
from .loading import ALL_KINDS, VERIFIERS, load_prm
from .base import PRM, PRMHandle
from .callable import CallablePRM
from .scorer import ModelPRM, PRMOutOfBlocks

__all__ = ["AGGREGATIONS", "ALL_KINDS", "FORMATS", "KINDS", "MATH_SHEPHERD_LAYOUTS", "QWEN_PRM_SYSTEM", "VERIFIERS", "PRM",
           "CallablePRM", "Format", "ModelPRM", "PRMHandle", "PRMOutOfBlocks", "aggregate", "load_prm", "make_format"]
