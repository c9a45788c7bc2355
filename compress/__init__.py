"""compress: turn a transformer into a compact, verified ONNX student."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _register_pruned_types() -> None:
    """Pruned models whose per-layer sizes a plain config cannot say are saved as `compress_pruned_<family>`
    (compress.prune.reload); this makes `AutoModelFor...from_pretrained` load them once transformers is
    imported, without importing transformers here."""
    from compress.prune.reload import register_when_transformers_loads

    register_when_transformers_loads()


_register_pruned_types()


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
