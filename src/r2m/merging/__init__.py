"""Training-free merging of specialists: WA, TA, TIES, CART and R²M (docs/method.md, "Merging").

Each method is a pure function `(pretrained, specialists, **hyperparameters) -> MergeResult`
over state dicts or streamed safetensors files (`r2m.merging.stream`); `METHODS` maps names to
functions and hyperparameter schemas, `select` sweeps a grid against a caller's score.
"""

from r2m.merging.cart import cart
from r2m.merging.r2m import r2m
from r2m.merging.registry import METHODS, HParam, MethodSpec, get_method, merge
from r2m.merging.select import Selection, select
from r2m.merging.stream import DictSink, DictSource, DiskScratch, MemoryScratch, SafetensorsSink, SafetensorsSource
from r2m.merging.ta import task_arithmetic
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors
from r2m.merging.ties import ties
from r2m.merging.wa import weight_average

__all__ = [
    "METHODS",
    "DictSink",
    "DictSource",
    "DiskScratch",
    "HParam",
    "MemoryScratch",
    "MergeResult",
    "MethodSpec",
    "Runtime",
    "SafetensorsSink",
    "SafetensorsSource",
    "Selection",
    "TaskVectors",
    "cart",
    "get_method",
    "merge",
    "r2m",
    "select",
    "task_arithmetic",
    "ties",
    "weight_average",
]
