"""Parity of an ONNX model in ONNX Runtime against the PyTorch model it came from, on the same inputs."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import InputError
from compress.onnx.export import TaskOutputModule
from compress.onnx.runtime import make_session, run_session
from compress.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class ParityResult:
    """How close ORT's output is to PyTorch's. `output` names the graph output compared."""

    max_abs_diff: float
    cosine: float
    ok: bool
    output: str
    mean_abs_diff: float = 0.0
    compared: int = 0  # number of values compared (padding positions left out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays flattened, in float64 (1.0 for two all-zero arrays)."""
    a = a.reshape(-1).astype(np.float64)
    b = b.reshape(-1).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    return float(a @ b / (na * nb + 1e-300))


def valid_positions(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per-token outputs [batch, seq, ...] restricted to positions where the attention mask is 1: what
    padding positions hold is not defined by the model and differs between runtimes."""
    if mask is None or x.ndim < 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask.astype(bool)]


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    inputs: dict[str, torch.Tensor],
    *,
    task: str,
    atol: float = 1e-3,
    min_cosine: float = 0.999,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
) -> ParityResult:
    """Run the PyTorch model (eval mode, no grad) and the ONNX model on the same inputs and compare the task
    output: ok when the largest absolute difference is <= atol and the cosine similarity >= min_cosine.
    For per-token outputs, positions masked out by `attention_mask` are left out. NaN/inf fails."""
    output = get_task(task).output
    session = make_session(Path(onnx_path), provider=provider, threads=threads)
    declared = [i.name for i in session.get_inputs()]
    # PyTorch gets exactly what the graph gets, so that both compute the same function
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise InputError(f"parity: the inputs lack {', '.join(missing)}, which {Path(onnx_path).name} takes")
    ignored = sorted(set(inputs) - set(declared))
    if ignored:
        log.debug("parity: inputs %s are not graph inputs; left out of both runs", ignored)
    feed = {n: torch.as_tensor(inputs[n]) for n in declared}

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_t = TaskOutputModule(model, task)(**{k: v.to(device) for k, v in feed.items()})
    finally:
        model.train(was_training)
    ref = ref_t.detach().float().cpu().numpy()

    outs = run_session(session, {k: v.cpu().numpy() for k, v in feed.items()})
    name = output if output in outs else next(iter(outs))
    got = outs[name].astype(np.float32)
    if got.shape != ref.shape:
        return ParityResult(float("inf"), 0.0, False, name)

    mask = feed.get("attention_mask")
    mask_np = mask.cpu().numpy() if mask is not None else None
    a, b = valid_positions(got, mask_np), valid_positions(ref, mask_np)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return ParityResult(float("inf"), 0.0, False, name, float("inf"), int(a.size))
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    cos = cosine_similarity(a, b)
    ok = max_abs <= atol and cos >= min_cosine
    result = ParityResult(max_abs, cos, ok, name, mean_abs, int(a.size))
    log.info("parity %s: max abs diff %.3g (atol %g), cosine %.6f (min %g) -> %s",
             Path(onnx_path).name, max_abs, atol, cos, min_cosine, "ok" if ok else "MISMATCH")
    return result
