"""The KV-cache decoder's contract, shared by the exporter (compress.onnx.decoder), the generation loop
(compress.generate) and the session feeds (compress.onnx.runtime): the input/output names ONNX Runtime's and
optimum's decoders use, the `CacheLayout` written into the ONNX file's metadata, and the inputs a scoring batch
does not carry (an empty past, positions from the attention mask). numpy and onnx only, so every side can
import it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import InputError

# model_type -> how its cache is laid out is read from the config; these are the families tested here
CACHE_FAMILIES = ("gpt2", "llama", "qwen2")
METADATA_KEY = "compress.decoder"
PAST = "past_key_values.{i}.{kv}"
PRESENT = "present.{i}.{kv}"
# the exporter's symbolic dims -> the names optimum / ORT decoders use
DIM_NAMES = {"batch": "batch_size", "sequence": "sequence_length", "past": "past_sequence_length",
             "total": "total_sequence_length", "past + sequence": "total_sequence_length"}


@dataclass(frozen=True)
class CacheLayout:
    """What a runner needs to know about a decoder's cache."""

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    vocab_size: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def past_names(self) -> list[str]:
        return [PAST.format(i=i, kv=kv) for i in range(self.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [PRESENT.format(i=i, kv=kv) for i in range(self.num_layers) for kv in ("key", "value")]


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def cache_layout(config: Any, where: str = "export.cache") -> CacheLayout:
    """The cache layout of a HF decoder config; InputError for a family without cache support here."""
    family = str(getattr(config, "model_type", "") or "")
    base = getattr(config, "base_model_type", None)  # a compress_pruned_<family> keeps its family's layout
    fam = base if isinstance(base, str) and base in CACHE_FAMILIES else family
    if fam not in CACHE_FAMILIES:
        raise InputError(f"{where}: model family '{family or type(config).__name__}' has no KV-cache export; "
                         f"supported: {', '.join(CACHE_FAMILIES)} (set cache: false to export without the cache)")
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    kv = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return CacheLayout(family=fam, num_layers=layers, num_kv_heads=kv, head_dim=head_dim,
                       max_positions=int(positions) if positions else None, vocab_size=int(config.vocab_size),
                       eos_token_id=_first_int(getattr(config, "eos_token_id", None)),
                       bos_token_id=_first_int(getattr(config, "bos_token_id", None)))


def read_layout(path: Path) -> CacheLayout | None:
    """The cache layout stored in an exported decoder, None for a graph without a KV cache."""
    model = onnx.load(str(path), load_external_data=False)
    return layout_of(model)


def layout_of(model: onnx.ModelProto) -> CacheLayout | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return CacheLayout(**json.loads(prop.value))
    return None


def is_cache_graph(input_names: list[str]) -> bool:
    return any(n.startswith("past_key_values.") for n in input_names)


def default_input(name: str, inputs: Any, shape: list[Any], dtype: np.dtype | None) -> np.ndarray | None:
    """A decoder input a scoring batch does not carry: an empty past (prefill) or positions counted from the
    attention mask. None when `name` is not one of these."""
    ids = inputs.get("input_ids")
    if ids is None:
        return None
    ids = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
    if name.startswith("past_key_values."):
        heads, head_dim = shape[1], shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            return None
        return np.zeros((ids.shape[0], heads, 0, head_dim), dtype=dtype or np.float32)
    if name == "position_ids":
        mask = inputs.get("attention_mask")
        if mask is None:
            return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return positions_from_mask(np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask))
    return None


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions of the tokens under an attention mask: count of attended tokens before each (left padding
    gets position 1, as in transformers' generate)."""
    pos = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)
