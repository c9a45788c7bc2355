"""What passes consume and produce, and the check of a pipeline's order from those declarations (run by
`compress validate` and by `compress run` before anything starts).

Each Pass declares four sets of `Kind`s (compress.passes.base.Pass): `consumes` (must be in the artifact before
it runs), `refuses` (must not be: say, an already quantized graph for ptq), `produces` (in the artifact after it)
and `drops` (no longer in it: export replaces every ONNX model made before). The artifact the load step makes
holds a PyTorch student and a teacher. A pass that declares nothing is not checked."""
from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from compress.errors import ConfigError


class Kind(str, Enum):
    TORCH_STUDENT = "a PyTorch student"
    TEACHER = "a teacher"
    ONNX = "an ONNX model"
    ONNX_FP32 = "an fp32 ONNX model"
    ONNX_QUANTIZED = "a quantized (int8/int4, QDQ or integer-op) ONNX model"
    EVALUATION = "an evaluation of the ONNX models"


LOADED = (Kind.TORCH_STUDENT, Kind.TEACHER)  # what the load step puts in the first artifact


def _makers(kind: Kind, registered: dict[str, Any]) -> str:
    names = [name for name, cls in registered.items() if kind in getattr(cls, "produces", ())]
    return " or ".join(f"{{type: {n}}}" for n in names) if names else "a pass that makes it"


def check_order(passes: Sequence[Any], labels: Sequence[str], file: str, registered: dict[str, Any] | None = None) -> None:
    """ConfigError (exit code 2, one line) at the first pass whose declared input is missing or refused."""
    have: dict[Kind, str] = {k: "load" for k in LOADED}  # kind -> label of the pass that made it
    for i, (p, label) in enumerate(zip(passes, labels)):
        where = f"{file}: passes[{i}] ({p.type})"
        for kind in getattr(p, "refuses", ()):
            if kind in have:
                raise ConfigError(f"{where}: cannot run on {kind.value} (made by '{have[kind]}'); "
                                  f"{p.type} needs an artifact without one: remove it or move it before '{have[kind]}'")
        for kind in getattr(p, "consumes", ()):
            if kind not in have:
                hint = _makers(kind, registered or {})
                raise ConfigError(f"{where}: needs {kind.value}, which no pass before it makes; put {hint} before it")
        for kind in getattr(p, "drops", ()):
            have.pop(kind, None)
        for kind in getattr(p, "produces", ()):
            have[kind] = label

