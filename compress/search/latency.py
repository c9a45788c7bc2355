"""Measured cost of a candidate student on the run's target, as the pipeline will ship it: exported at init with
`compress.onnx.export`, quantized with dynamic int8 (`compress.onnx.quantize`), timed with
`compress.onnx.runtime.measure_latency` on `target` inputs; the int8 file's size comes with it.

`LatencyCache` keeps each measurement in one JSON file of the run's cache folder, keyed by the candidate's shape,
the family, the target and the versions of the toolchain, so a shape is timed once per target across runs.
`LatencyModel` is an optional fitted predictor (non-negative least squares of p50 on the multiply-accumulate
counts of the layers' linear maps and of attention, plus a constant): once it has enough measurements it
predicts before measuring, so the search can skip exporting candidates far over the budget; every later
measurement is compared with its prediction and the report shows the error, with a leave-one-out error over
every shape measured (`LatencyModel.error`).

**Load guard.** A latency measured while other work runs on the host is the host's load, not the shape's, and a
persisted cache would keep it for every later search. So a fixed reference graph (`probe`: six MatMuls, built
in code, about as long as a small student, timed with the target's provider and threads) is timed before and
after each measurement; its p50 is compared with the baseline, the fastest single probe run seen on this machine
and target (kept in the same cache file). When either probe's p50 is over the baseline by more than `tolerance`,
the measurement is noisy (`judge`): `guarded_measure` measures again (`retries`), and if it stays noisy the
fastest single run of the candidate stands in for its p50 in this run only, and is never persisted. Every
persisted entry records its probes; an entry whose probe is over the current baseline by more than `tolerance`,
or that has no probe or another probe's (written before the guard, or with another reference graph), is stale: `LatencyCache.get` does not return it, so the shape
is measured again."""
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
    """key -> measurement, persisted in `folder/search-latency.json` (written atomically after each store), plus
    the probe baselines of the load guard (keys starting with `probe:`). An entry is returned by `get` only if
    its probes were within `tolerance` of the current baseline (see the module docstring)."""

    def __init__(self, folder: Path | None, tolerance: float = 0.5, probe_key: str | None = None):
        self.path = None if folder is None else Path(folder) / CACHE_FILE
        self.tolerance, self.probe_key = tolerance, probe_key
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        self.stale = 0  # entries found but not trusted (measured under load, or before the guard): measured again
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("latency cache %s is unreadable; starting a new one", self.path)

    def baseline(self) -> float | None:
        """The fastest probe run seen for this cache's probe key (None: none yet, or no guard). The fastest single
        run rather than a p50: under load a few runs still fall between the other processes' time slices, so even a
        first probe on a busy host gives a near-idle baseline."""
        if self.probe_key is None:
            return None
        entry = self.entries.get(f"probe:{self.probe_key}")
        return None if entry is None else float(entry["p50_ms"])

    def see_probe(self, p50_ms: float) -> float:
        """Record a probe's fastest run; the baseline becomes the fastest seen. Returns the baseline."""
        base = self.baseline()
        if self.probe_key is not None and (base is None or p50_ms < base):
            self.entries[f"probe:{self.probe_key}"] = {"p50_ms": float(p50_ms)}
            self._write()
            base = float(p50_ms)
        return float(p50_ms) if base is None else base

    def trusted(self, entry: dict[str, Any]) -> bool:
        """Whether a stored measurement's probes were within tolerance of the current baseline."""
        if self.probe_key is None:
            return True
        probe = entry.get("probe_ms")
        base = self.baseline()
        if probe is None or base is None or entry.get("probe_key") != self.probe_key:  # another probe: not comparable
            return False
        return judge(probe, probe, base, self.tolerance) is None

    def get(self, key: str) -> dict[str, Any] | None:
        hit = self.entries.get(key)
        if hit is not None and not self.trusted(hit):
            self.stale += 1
            hit = None
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key] = value
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".search-latency.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def export_for_timing(model: nn.Module, task: str, target: Any, folder: Path,
                      op_types: tuple[str, ...] = ("MatMul", "Gemm"), precision: str = "int8") -> dict[str, Any]:
    """Export `model` (fp32) into `folder` and, with `precision` int8 (as the ptq pass ships it), quantize the
    export (dynamic int8 of `op_types`; add Gather for ptq's `quantize_embeddings`). Returns the graph to time
    (`path`), the `inputs` of `target`'s shape, fp32_mb and int8_mb (None for fp32)."""
    import torch

    from compress.onnx.export import export_onnx
    from compress.onnx.quantize import quantize_dynamic_int8
    from compress.onnx.runtime import onnx_size_mb
    from compress.tasks import get_task

    if precision not in ("int8", "fp32"):
        raise ValueError(f"precision must be int8 or fp32, got {precision!r}")
    spec = get_task(task)
    folder.mkdir(parents=True, exist_ok=True)
    example = {k: torch.as_tensor(v) for k, v in
               spec.synthetic_inputs(model.config, batch_size=2, seq_len=min(8, target.seq_len)).items()}
    fp32 = export_onnx(model, example, folder / "model.onnx", task=task)
    path, int8_mb = fp32, None
    if precision == "int8":
        path = quantize_dynamic_int8(fp32, folder / "model.int8.onnx", op_types=op_types)
        int8_mb = onnx_size_mb(path)
    inputs = spec.synthetic_inputs(model.config, batch_size=target.batch_size, seq_len=target.seq_len,
                                   image_size=target.image_size)
    return {"path": path, "inputs": inputs, "fp32_mb": onnx_size_mb(fp32), "int8_mb": int8_mb}


def time_graph(exported: dict[str, Any], target: Any) -> dict[str, Any]:
    """Time an `export_for_timing` result on `target`: p50_ms, p90_ms, min_ms, with its fp32_mb and int8_mb."""
    from compress.onnx.runtime import measure_latency

    lat = measure_latency(exported["path"], exported["inputs"], provider=target.provider, threads=target.threads,
                          warmup=target.warmup, runs=target.runs)
    return {"p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "min_ms": lat["min_ms"],
            "int8_mb": exported["int8_mb"], "fp32_mb": exported["fp32_mb"]}


def measure(model: nn.Module, task: str, target: Any, folder: Path,
            op_types: tuple[str, ...] = ("MatMul", "Gemm"), precision: str = "int8") -> dict[str, Any]:
    """Export `model` and time it on `target` (a `compress.config.Target`): with `precision` int8 the dynamic-int8
    graph of `op_types`, with fp32 the export itself (`export_for_timing`, then `time_graph`). Returns p50_ms,
    p90_ms, min_ms (of the timed graph), fp32_mb and int8_mb (None for fp32)."""
    return time_graph(export_for_timing(model, task, target, folder, op_types, precision), target)


# ---------------------------------------------------------------------------------------------- load guard
# rows x width x MatMuls of the reference graph: about 2 ms a run on an idle core, like the students it guards.
# A much smaller graph (64 x 256 x 3, 0.23 ms) was tried first: its runs fit between the other processes' time
# slices and it timed the same at a load of 13 on 2 cores as idle, while the students ran 10x slower.
PROBE_SIZE = (64, 512, 6)


def probe_key(target: Any) -> str:
    """What the probe's baseline depends on: machine, CPU, provider, threads, ONNX Runtime."""
    import hashlib

    import onnxruntime

    blob = [platform.machine(), platform.processor(), os.cpu_count(), target.provider, target.threads,
            onnxruntime.__version__, PROBE_SIZE]
    return hashlib.sha256(json.dumps(blob, default=str).encode()).hexdigest()[:16]


def probe_graph(folder: Path) -> Path:
    """The reference graph (`PROBE_SIZE`: MatMul + Relu of fixed seeded weights), written once into `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, d, k = PROBE_SIZE
    path = Path(folder) / f"latency-probe-{n}x{d}x{k}.onnx"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(k):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "latency_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, d])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [n, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe.", suffix=".onnx")
    os.close(fd)
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


def probe(target: Any, folder: Path, runs: int = 30) -> tuple[float, float]:
    """(p50, fastest run) in ms of the reference graph on `target`'s provider and threads."""
    from compress.onnx.runtime import measure_latency

    x = np.random.default_rng(1).standard_normal(PROBE_SIZE[:2]).astype(np.float32)
    lat = measure_latency(probe_graph(folder), {"x": x}, provider=target.provider, threads=target.threads,
                          warmup=5, runs=runs)
    return float(lat["p50_ms"]), float(lat["min_ms"])


def judge(before_ms: float, after_ms: float, baseline_ms: float, tolerance: float) -> str | None:
    """None when both probes are within `tolerance` of the baseline, else why the measurement is noisy."""
    worst = max(before_ms, after_ms)
    if worst > baseline_ms * (1 + tolerance):
        return (f"probe {worst:.3f} ms ({'before' if before_ms >= after_ms else 'after'}) > baseline "
                f"{baseline_ms:.3f} ms + {tolerance:.0%}")
    return None


def guarded_measure(measure_fn: Any, probe_fn: Any, cache: LatencyCache, retries: int = 2) -> dict[str, Any]:
    """`measure_fn()` (a timing only: export once, before) between two `probe_fn()` timings ((p50, fastest run) of the reference graph), repeated up to
    `retries` more times while the probes say the host was loaded (`judge` of the probes' p50 against `cache`'s
    baseline, the fastest probe run seen). Returns the clean measurement with probe_before_ms, probe_after_ms,
    probe_ms, baseline_ms, load (1-minute load average), attempts and noisy=None; or, when every attempt was
    noisy, the attempt with the fastest single run, whose p50_ms is then that fastest run (the loaded p50 kept as
    loaded_p50_ms: under load the median times the other processes, the fastest run is the closest to the shape's
    own latency) and noisy = the reason. The caller persists only clean measurements."""
    best: dict[str, Any] | None = None
    for attempt in range(1, retries + 2):
        before, before_min = probe_fn()
        cache.see_probe(before_min)
        result = dict(measure_fn())
        after, after_min = probe_fn()
        base = cache.see_probe(after_min)
        reason = judge(before, after, base, cache.tolerance)
        result.update(probe_key=cache.probe_key, probe_before_ms=before, probe_after_ms=after,
                      probe_ms=max(before, after), baseline_ms=base,
                      load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, attempts=attempt, noisy=reason)
        if reason is None:
            return result
        log.info("latency measurement noisy (attempt %d): %s", attempt, reason)
        fastest = result.get("min_ms", result["p50_ms"])
        if best is None or fastest < best.get("min_ms", best["p50_ms"]):
            best = result
    assert best is not None
    best["attempts"] = retries + 1
    best["loaded_p50_ms"] = best["p50_ms"]
    best["p50_ms"] = best.get("min_ms", best["p50_ms"])
    return best


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
    skipped: int = 0  # noisy measurements left out of the fit

    def _x(self, shape: dict[str, Any]) -> list[float]:
        return features(shape, self.head_dim, self.seq_len, self.batch)

    def predict(self, shape: dict[str, Any]) -> float | None:
        if self.coef is None:
            return None
        return float(np.dot(self._x(shape), self.coef))

    def add(self, shape: dict[str, Any], measured_ms: float, predicted_ms: float | None, noisy: bool = False) -> None:
        """A measurement (and the prediction made before it). A noisy one (taken under load, see the load guard)
        is neither fitted nor checked: on a busy host one loaded point skewed the fit so far that it rejected half
        of the space by prediction (docs/search.md)."""
        if noisy:
            self.skipped += 1
            return
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
        """How well the model predicts: `checked`, mean and max |pred - meas| / meas of the predictions made
        before measuring (the ones the search acted on), and `loo_*`: the same over every measured shape, each
        predicted by a fit on all the others (leave-one-out; needs more points than regressors)."""
        out: dict[str, Any] = {"checked": 0, "measured": len(self.ys), "noisy_skipped": self.skipped}
        rel = [abs(p - m) / m for p, m in self.checks if m > 0]
        if rel:
            out.update(checked=len(rel), mean_abs_rel_error=float(np.mean(rel)), max_abs_rel_error=float(np.max(rel)))
        loo = self.leave_one_out()
        if loo:
            out.update(loo_points=len(loo), loo_mean_abs_rel_error=float(np.mean(loo)),
                       loo_max_abs_rel_error=float(np.max(loo)))
        out["coef"] = None if self.coef is None else [float(c) for c in self.coef]
        return out

    def leave_one_out(self) -> list[float]:
        """|pred - meas| / meas of each measured shape from a fit on the others ([] with too few points)."""
        from scipy.optimize import nnls

        if len(self.ys) <= len(self.xs[0] if self.xs else []) or not self.ys:
            return []
        x, y = np.asarray(self.xs), np.asarray(self.ys)
        rel = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            coef, _ = nnls(x[keep], y[keep])
            if y[i] > 0:
                rel.append(abs(float(x[i] @ coef) - y[i]) / y[i])
        return rel
