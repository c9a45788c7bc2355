"""Measured cost of a candidate student on the run's target, as the pipeline will ship it: exported at init with
`compress.onnx.export`, quantized with dynamic int8 (`compress.onnx.quantize`), timed with
`compress.onnx.runtime.measure_latency` on `target` inputs; the int8 file's size comes with it.

`LatencyCache` keeps each measurement in one JSON file of the run's cache folder, keyed by the candidate's shape,
the family, the target and the versions of the toolchain, so a shape is timed once per target across runs.
`LatencyModel` is an optional fitted predictor (non-negative least squares of p50 on the multiply-accumulate
counts of the layers' linear maps and of attention, plus a constant): once it has enough measurements it
predicts before measuring, so the search can skip exporting candidates far over the budget; every later
measurement is compared with its prediction and the report shows the error."""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

log = logging.getLogger(__name__)

CACHE_FILE = "search-latency.json"


def toolchain_versions() -> dict[str, str | None]:
    from compress.report.render import versions

    v = versions()
    return {k: v.get(k) for k in ("compress", "torch", "transformers", "onnx", "onnxruntime")}


def cache_key(shape: dict[str, Any], target: dict[str, Any], versions: dict[str, Any] | None = None) -> str:
    import hashlib

    blob = {"shape": shape, "target": target, "versions": versions if versions is not None else toolchain_versions(),
            "machine": platform.machine(), "cpu": platform.processor()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


class LatencyCache:
    """key -> measurement, persisted in `folder/search-latency.json` (written atomically after each store)."""

    def __init__(self, folder: Path | None):
        self.path = None if folder is None else Path(folder) / CACHE_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("latency cache %s is unreadable; starting a new one", self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".search-latency.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def measure(model: nn.Module, task: str, target: Any, folder: Path,
            op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> dict[str, float]:
    """Export `model` (fp32), quantize it (dynamic int8 of `op_types`, as the ptq pass does; add Gather for its
    `quantize_embeddings`) and time the int8 graph on `target` (a `compress.config.Target`). Returns p50_ms,
    p90_ms, int8_mb and fp32_mb."""
    import torch

    from compress.onnx.export import export_onnx
    from compress.onnx.quantize import quantize_dynamic_int8
    from compress.onnx.runtime import measure_latency, onnx_size_mb
    from compress.tasks import get_task

    spec = get_task(task)
    folder.mkdir(parents=True, exist_ok=True)
    example = {k: torch.as_tensor(v) for k, v in
               spec.synthetic_inputs(model.config, batch_size=2, seq_len=min(8, target.seq_len)).items()}
    fp32 = export_onnx(model, example, folder / "model.onnx", task=task)
    int8 = quantize_dynamic_int8(fp32, folder / "model.int8.onnx", op_types=op_types)
    inputs = spec.synthetic_inputs(model.config, batch_size=target.batch_size, seq_len=target.seq_len,
                                   image_size=target.image_size)
    lat = measure_latency(int8, inputs, provider=target.provider, threads=target.threads, warmup=target.warmup,
                          runs=target.runs)
    return {"p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "int8_mb": onnx_size_mb(int8),
            "fp32_mb": onnx_size_mb(fp32)}


def features(shape: dict[str, Any], head_dim: int, seq_len: int, batch: int) -> list[float]:
    """Regressors of the latency model: a constant, multiply-accumulates of the layers' linear maps (q, o, k/v,
    FFN; in millions) and of attention scores and mixing (in millions), and the layer count."""
    n, h, a, kv, f = shape["layers"], shape["hidden"], shape["heads"], shape.get("kv_heads") or shape["heads"], shape["ffn"]
    t = seq_len * batch
    linear = n * t * h * (2 * a * head_dim + 2 * kv * head_dim + 2 * f)
    attention = n * batch * 2 * seq_len * seq_len * a * head_dim
    return [1.0, linear / 1e6, attention / 1e6, float(n)]


@dataclass
class LatencyModel:
    """p50 ~ non-negative combination of `features`; refitted after each measurement."""

    head_dim: int
    seq_len: int
    batch: int
    min_points: int = 6
    xs: list[list[float]] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    coef: np.ndarray | None = None
    checks: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured) made before measuring

    def _x(self, shape: dict[str, Any]) -> list[float]:
        return features(shape, self.head_dim, self.seq_len, self.batch)

    def predict(self, shape: dict[str, Any]) -> float | None:
        if self.coef is None:
            return None
        return float(np.dot(self._x(shape), self.coef))

    def add(self, shape: dict[str, Any], measured_ms: float, predicted_ms: float | None) -> None:
        if predicted_ms is not None:
            self.checks.append((predicted_ms, measured_ms))
        x = self._x(shape)
        if x in self.xs:  # the same shape again (a cache hit): nothing new to fit
            return
        self.xs.append(x)
        self.ys.append(measured_ms)
        if len(self.ys) >= self.min_points:
            from scipy.optimize import nnls

            coef, _ = nnls(np.asarray(self.xs), np.asarray(self.ys))
            self.coef = coef

    def error(self) -> dict[str, Any]:
        """Relative error of the predictions made before measuring (mean and max |pred - meas| / meas)."""
        if not self.checks:
            return {"checked": 0}
        rel = [abs(p - m) / m for p, m in self.checks if m > 0]
        return {"checked": len(rel), "mean_abs_rel_error": float(np.mean(rel)), "max_abs_rel_error": float(np.max(rel)),
                "coef": None if self.coef is None else [float(c) for c in self.coef]}
