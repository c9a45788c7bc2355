"""ONNX Runtime sessions, feeds, latency, and ONNX file I/O (atomic saves, external data, size on disk)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from compress.errors import InputError

log = logging.getLogger(__name__)

# Above this many bytes of initializers a model is saved with its weights in an external data file
# (protobuf cannot serialise a message over 2 GiB); below it, as one self-contained file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# ORT's type strings -> numpy dtypes, for casting feeds to what the graph declares
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}

# inputs that have an obvious value when the caller does not give them: (filled value, shaped like)
_DEFAULT_INPUTS = {"attention_mask": 1, "token_type_ids": 0}


# ----------------------------------------------------------------------------------------------- files
def _require_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file not found; export the model first (pass `export`) or fix the path")
    return path


def external_data_files(path: Path) -> list[Path]:
    """The external data files an ONNX model refers to (absolute paths, in order of first use)."""
    path = _require_file(path)
    st = path.stat()
    return [Path(p) for p in _external_locations(str(path.resolve()), st.st_mtime_ns, st.st_size)]


@functools.lru_cache(maxsize=64)
def _external_locations(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    # mtime and size are in the key so that a rewritten file is read again
    del mtime_ns, size
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is not a model
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    base = Path(path).parent
    seen: dict[str, None] = {}
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if "location" in info:
                seen[str((base / info["location"]).resolve())] = None
    return tuple(seen)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def onnx_size_mb(path: Path) -> float:
    """Size on disk in MiB (2**20 bytes) of an ONNX model, its external data files included."""
    path = _require_file(path)
    total = path.stat().st_size + sum(p.stat().st_size for p in external_data_files(path) if p.is_file())
    return total / 2**20


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held in (or referenced by) a model's initializers."""
    total = 0
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            total += int(info.get("length", 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


@contextmanager
def atomic_onnx_path(dst: Path) -> Iterator[Path]:
    """Yield a temporary path to write an ONNX model to; on success, move it (and the external data files
    it refers to, first) to `dst` with os.replace. On any error, or Ctrl-C, nothing is left behind.

    The temporary path has the same file name as `dst`, in a hidden folder next to it, so that external
    data written as `<name>.data` keeps a valid relative location after the move."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        target = tmpdir / dst.name
        yield target
        if not target.is_file():
            raise RuntimeError(f"no ONNX model was written to {target}")
        data = [p for p in external_data_files(target) if p.parent == tmpdir.resolve()]
        for p in data:
            os.replace(p, dst.parent / p.name)
        os.replace(target, dst)
        stale = dst.parent / f"{dst.name}.data"  # left over from an earlier save with external data
        if stale.exists() and stale.name not in {p.name for p in data}:
            stale.unlink()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_proto(model: onnx.ModelProto, path: Path) -> bool:
    """Write a model (not atomically: see save_model): one self-contained file when the weights fit under
    protobuf's 2 GiB limit, else the weights go to `<name>.data` next to it. The proto must hold its weights
    (loaded with external data); with external data it is left pointing at the file. Returns whether it did."""
    path = Path(path)
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path), save_as_external_data=False)
    return external


def save_model(model: onnx.ModelProto, dst: Path) -> Path:
    """Save a model atomically at `dst` (see write_proto for the external-data rule)."""
    dst = Path(dst)
    with atomic_onnx_path(dst) as tmp:
        external = write_proto(model, tmp)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("saved %s (%.2f MiB%s)", dst, onnx_size_mb(dst), ", external data" if external else "")
    return dst


def load_model(path: Path) -> onnx.ModelProto:
    """Load a model with its external data, with a clear error for a missing or broken file."""
    path = _require_file(path)
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None


@contextmanager
def quiet_logs(*names: str, level: int = logging.ERROR, root: bool = False) -> Iterator[None]:
    """For the duration of a block, raise the named loggers to `level`, and with `root` drop records below
    `level` logged on the root logger itself (onnxruntime.quantization calls logging.warning() directly).
    The root logger's level is left alone, so every other logger (ours included) still reports."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    def flt(record: logging.LogRecord) -> bool:  # logging takes a callable as a filter
        return record.levelno >= level

    if root:
        logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)
        if root:
            logging.getLogger().removeFilter(flt)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -------------------------------------------------------------------------------------------- sessions
def make_session(path: Path, *, provider: str = "CPUExecutionProvider", threads: int | None = None) -> ort.InferenceSession:
    """An ORT session on one execution provider (CPU as the fallback for ops it lacks).

    `threads` sets intra-op threads (None: ORT's choice); inter-op parallelism is off (sequential execution)."""
    path = _require_file(path)
    available = ort.get_available_providers()
    if provider not in available:
        raise InputError(
            f"target.provider: '{provider}' is not available in this onnxruntime (available: {', '.join(available)}); "
            "install the matching onnxruntime build (e.g. onnxruntime-gpu for CUDAExecutionProvider) or use CPUExecutionProvider"
        )
    if threads is not None and threads < 1:
        raise InputError(f"target.threads: {threads} must be a positive number of threads (or unset for ORT's choice)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
        raise InputError(f"{path}: ONNX Runtime cannot load it ({_first_line(exc)})") from None


def input_specs(session: ort.InferenceSession) -> dict[str, tuple[np.dtype | None, list[Any]]]:
    """name -> (numpy dtype or None if unknown, declared shape) of each graph input."""
    return {i.name: (_ORT_DTYPES.get(i.type), list(i.shape)) for i in session.get_inputs()}


def prepare_feed(inputs: Mapping[str, Any], specs: Mapping[str, tuple[np.dtype | None, list[Any]]]) -> dict[str, np.ndarray]:
    """Keep only the inputs the graph declares, as numpy arrays of the declared dtypes.

    A missing `attention_mask` (ones) or `token_type_ids` (zeros) is filled in, shaped like `input_ids`;
    any other missing input is an error that names it."""
    feed: dict[str, np.ndarray] = {}
    for name, (dtype, _shape) in specs.items():
        if name in inputs:
            arr = _to_numpy(inputs[name])
        elif name in _DEFAULT_INPUTS and "input_ids" in inputs:
            arr = np.full(_to_numpy(inputs["input_ids"]).shape, _DEFAULT_INPUTS[name])
            log.debug("input '%s' not given; filled with %d", name, _DEFAULT_INPUTS[name])
        elif (arr := _decoder_default(name, inputs, _shape, dtype)) is not None:  # KV-cache decoder: empty past
            pass
        else:
            raise InputError(
                f"ONNX input '{name}' is missing from the inputs given ({', '.join(sorted(inputs)) or 'none'}); "
                "give it in the batch (check the tokenizer/processor matches the model)"
            )
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        feed[name] = np.ascontiguousarray(arr)
    return feed


def _decoder_default(name: str, inputs: Mapping[str, Any], shape: list[Any], dtype: np.dtype | None) -> np.ndarray | None:
    from compress.onnx.cache import default_input

    return default_input(name, inputs, shape, dtype)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_session(session: ort.InferenceSession, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run a session on the inputs it declares (cast to its dtypes); outputs by name, in graph order."""
    feed = prepare_feed(inputs, input_specs(session))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def measure_latency(
    path: Path,
    inputs: Mapping[str, Any],
    *,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Wall-clock latency of one `session.run` on `inputs`, after `warmup` runs.

    Stops early once `max_seconds` of timed runs have passed (at least 3 runs are always timed).
    Returns p50_ms, p90_ms, mean_ms, min_ms, std_ms and runs (the number of timed runs)."""
    if runs < 1 or warmup < 0:
        raise InputError(f"target.runs: need runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    stats = _latency_stats(_timed_runs(path, inputs, provider=provider, threads=threads, warmup=warmup, runs=runs,
                                       max_seconds=max_seconds))
    log.debug("latency of %s on %s (threads %s): %s", path, provider, threads, stats)
    return stats


def _timed_runs(path: Path, inputs: Mapping[str, Any], *, provider: str, threads: int | None, warmup: int, runs: int,
                max_seconds: float | None = None) -> list[float]:
    """Milliseconds of each timed `session.run` of a fresh session of `path` after `warmup` untimed runs; the
    session is gone when this returns. Stops early once `max_seconds` of timed runs have passed (at least 3)."""
    session = make_session(path, provider=provider, threads=threads)
    feed = prepare_feed(inputs, input_specs(session))
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feed)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(names, feed)
        times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def _latency_stats(times_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / mean / min / std (ms) and the count of a list of timed runs."""
    arr = np.asarray(times_ms, dtype=np.float64)
    p50, p90 = np.percentile(arr, [50, 90])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "mean_ms": float(arr.mean()), "min_ms": float(arr.min()),
            "std_ms": float(arr.std()), "runs": int(arr.size)}


def measure_latency_rounds(
    models: Mapping[str, Path],
    inputs: Mapping[str, Mapping[str, Any]],
    *,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 5,
    reference: str | None = None,
    rewarm: int = 3,
) -> dict[str, dict[str, float]]:
    """measure_latency for several models at once, fair on a noisy host: `rounds` rounds each time every model
    `runs / rounds` times (the order rotating from round to round), so a slow phase of the machine hits all of them
    alike. `inputs` maps each name to its feed.

    One session is alive at a time: each model's block in a round makes its session, runs it `warmup` times
    untimed, times it, and drops it. Sessions kept alive side by side (as this did before) slowed one another on
    a 2-core host: their idle intra-op thread pools still competed for the cores, and the demo's int8 student
    measured 2.7x faster than the fp32 teacher in the evaluate pass but 8.2x timed alone; a deployed model runs
    in its own process. The warm-up also refills the CPU caches the model timed before it has pushed out (an 87 MB
    fp32 teacher before a 6 MB int8 student). `rewarm` is a floor on that warm-up.

    Returns, per name, what measure_latency returns (p50/p90 over all its timed runs) plus, with a `reference`
    name, `speedup`: the median over rounds of (reference's round median / this model's round median)."""
    if runs < 1 or warmup < 0 or rounds < 1:
        raise InputError(f"target.runs: need runs >= 1, warmup >= 0 and rounds >= 1 (got {runs}, {warmup}, {rounds})")
    names = list(models)
    if reference is not None and reference not in models:
        raise ValueError(f"reference '{reference}' is not one of the models timed ({', '.join(names)})")
    per_round = max(1, -(-runs // rounds))
    times: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            got = _timed_runs(models[n], inputs[n], provider=provider, threads=threads, warmup=max(warmup, rewarm),
                              runs=per_round)
            times[n] += got
            medians[n].append(float(np.median(got)))
    result: dict[str, dict[str, float]] = {}
    for n in names:
        result[n] = {**_latency_stats(times[n]), "rounds": rounds}
        if reference is not None:
            ratios = [a / b for a, b in zip(medians[reference], medians[n]) if b > 0]
            result[n]["speedup"] = float(np.median(ratios)) if ratios else float("nan")
    log.debug("interleaved latency (%d rounds, threads %s): %s", rounds, threads, result)
    return result
