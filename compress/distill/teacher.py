"""The frozen teacher of a distillation: freezing it, loading its Linear layers in 8 or 4 bits
(bitsandbytes), and caching its outputs on disk so later epochs skip its forward pass."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from compress.errors import InputError

log = logging.getLogger(__name__)

TeacherQuantization = Literal["none", "8bit", "4bit"]


class TeacherConfig(BaseModel):
    """How a training pass holds its teacher (the distill pass's config has these fields)."""

    model_config = ConfigDict(extra="forbid")

    teacher_quantization: TeacherQuantization = Field(
        "none", description="Load the frozen teacher's Linear layers in 8-bit (LLM.int8) or 4-bit (NF4) with "
        "bitsandbytes to save memory.")
    teacher_cache: bool = Field(False, description="Cache the teacher's outputs on disk, keyed by the batch, so "
                                "later epochs skip the teacher's forward (needs a deterministic, dropout-free "
                                "teacher; logits of large vocabularies take much disk).")

DEFAULT_KEEP_FULL_PRECISION = ("lm_head", "classifier", "score", "qa_outputs")


def prepare_teacher(
    teacher: nn.Module,
    cfg: TeacherConfig | str = "none",
    *,
    keep_full_precision: Iterable[str] = DEFAULT_KEEP_FULL_PRECISION,
) -> nn.Module:
    """Freeze the teacher (no gradients, eval mode) and, for `teacher_quantization` '8bit' / '4bit', replace its
    `nn.Linear` layers in place with bitsandbytes `Linear8bitLt` (LLM.int8) / `Linear4bit` (NF4), except the
    output heads named in `keep_full_precision` (matched on the last part of the module name). The quantised
    layers stay on the device the teacher is on (bitsandbytes runs them on CPU and CUDA). GPT-2's `Conv1D`
    layers are not `nn.Linear` and stay as they are. Returns the teacher."""
    mode = cfg if isinstance(cfg, str) else cfg.teacher_quantization
    if mode not in ("none", "8bit", "4bit"):
        raise InputError(f"teacher_quantization: {mode!r} is not one of none, 8bit, 4bit")
    if mode != "none":
        bnb = _import_bitsandbytes(mode)
        keep = set(keep_full_precision)
        targets = [(name, m) for name, m in teacher.named_modules()
                   if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in keep]
        for name, lin in targets:
            parent_name, _, child = name.rpartition(".")
            parent = teacher.get_submodule(parent_name) if parent_name else teacher
            setattr(parent, child, _quantized_linear(bnb, lin, mode))
        log.info("teacher: %d Linear layers quantised to %s", len(targets), mode)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _import_bitsandbytes(mode: str) -> Any:
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise InputError(f"teacher_quantization={mode!r} needs bitsandbytes: pip install bitsandbytes") from e
    except Exception as e:  # a broken install raises other errors at import
        raise InputError(f"teacher_quantization={mode!r}: bitsandbytes failed to load ({e}); reinstall it "
                         f"or set teacher_quantization: none") from e


def _quantized_linear(bnb: Any, lin: nn.Linear, mode: str) -> nn.Module:
    weight = lin.weight.data
    device = weight.device
    has_bias = lin.bias is not None
    q: nn.Module
    if mode == "8bit":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(weight.detach().cpu().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=weight.dtype,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4")
    if has_bias:
        q.bias = nn.Parameter(lin.bias.detach().cpu().clone(), requires_grad=False)  # type: ignore[union-attr]
    return q.to(device)  # moving the module quantises the weights


# --------------------------------------------------------------------------------------------------------------
# teacher cache


class TeacherCache:
    """On-disk cache of teacher outputs keyed by a hash of the batch's tensors (and `namespace`, which should
    identify the teacher, say its fingerprint). Each entry is a safetensors file written atomically; outputs
    may be a tensor or any nesting of dicts, tuples, lists and `transformers` ModelOutputs of tensors (None and
    plain numbers allowed) and come back with the same structure and class, on the batch's device.

    Usage: `teacher_out = cache.cached(lambda b: teacher(**b), batch)`."""

    def __init__(self, root: Path, namespace: str = ""):
        self.root = Path(root)
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def key(self, batch: Mapping[str, Any], salt: str = "") -> str:
        """The entry's name: a hash of the namespace, `salt` (what else the outputs depend on, say which
        captures were asked for) and the batch's tensors."""
        h = hashlib.sha256(self.namespace.encode())
        if salt:
            h.update(f"|salt:{salt}".encode())
        for k in sorted(batch):
            v = batch[k]
            h.update(f"|{k}:".encode())
            if isinstance(v, Tensor):
                t = v.detach().contiguous().cpu()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(json.dumps(v, sort_keys=True, default=repr).encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def cached(self, teacher_fn: Callable[[Mapping[str, Any]], Any], batch: Mapping[str, Any], salt: str = "") -> Any:
        """The teacher's outputs for `batch`: read from the cache, or computed (under no_grad) and stored."""
        key = self.key(batch, salt)
        device = next((v.device for v in batch.values() if isinstance(v, Tensor)), torch.device("cpu"))
        found = self.get(key, device)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        with torch.no_grad():
            out = teacher_fn(batch)
        self.put(key, out)
        return out

    def get(self, key: str, device: torch.device | str = "cpu") -> Any | None:
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                spec = json.loads(f.metadata()["structure"])
            tensors = load_file(str(path), device=str(device))
            return _unflatten(spec, tensors)
        except Exception as e:  # unreadable entry: recompute it
            log.warning("teacher cache: ignoring unreadable %s (%s)", path, e)
            return None

    def put(self, key: str, outputs: Any) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        spec = _flatten(outputs, tensors)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"structure": json.dumps(spec)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _flatten(obj: Any, tensors: dict[str, Tensor]) -> dict[str, Any]:
    if isinstance(obj, Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"t": "tensor", "k": name}
    if obj is None:
        return {"t": "none"}
    if isinstance(obj, (bool, int, float, str)):
        return {"t": "value", "v": obj}
    if isinstance(obj, Mapping):
        cls = type(obj)
        cls_name = None if cls is dict else f"{cls.__module__}:{cls.__qualname__}"
        return {"t": "dict", "cls": cls_name, "items": [[str(k), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (tuple, list)):
        return {"t": "list" if isinstance(obj, list) else "tuple", "items": [_flatten(v, tensors) for v in obj]}
    raise TypeError(f"teacher cache: cannot store a {type(obj).__name__} (tensors, dicts, tuples, lists only)")


def _unflatten(spec: dict[str, Any], tensors: dict[str, Tensor]) -> Any:
    kind = spec["t"]
    if kind == "tensor":
        return tensors[spec["k"]]
    if kind == "none":
        return None
    if kind == "value":
        return spec["v"]
    if kind in ("list", "tuple"):
        items = [_unflatten(s, tensors) for s in spec["items"]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        items = {k: _unflatten(s, tensors) for k, s in spec["items"]}
        if spec["cls"] is None:
            return items
        module, _, qualname = spec["cls"].partition(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, Mapping)):
            raise TypeError(f"teacher cache: {spec['cls']} is not a mapping type")
        return cls(**items)
    raise ValueError(f"teacher cache: unknown entry kind {kind!r}")
