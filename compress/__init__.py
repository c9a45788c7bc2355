"""compress: turn a transformer into a compact, verified ONNX student."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(config: Any, overrides: list[str] | None = None, **kwargs: Any) -> Any:
    """Run a pipeline from a RunConfig or the path of a model.yaml; returns a RunResult."""
    from compress.pipeline import run as _run

    return _run(config, overrides, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from compress.pipeline import Pipeline

        return Pipeline
    if name == "Pass":
        from compress.passes.base import Pass

        return Pass
    if name == "register":
        from compress.registry import register

        return register
    raise AttributeError(name)


__all__ = ["run", "Pipeline", "Pass", "register", "__version__"]
