"""Decoder-only causal LMs to ONNX *with* the KV cache (GPT-2, LLaMA, Qwen2: GQA and RoPE included).

One graph serves prefill (past length 0) and decode (one new token on a past of any length). Its inputs and
outputs follow the names ONNX Runtime's and optimum's decoders use, so existing runners can load it:

    inputs   input_ids [batch_size, sequence_length] int64
             attention_mask [batch_size, total_sequence_length] int64      (past + new positions)
             position_ids [batch_size, sequence_length] int64
             past_key_values.{i}.key / .value [batch_size, kv_heads, past_sequence_length, head_dim] float
    outputs  logits [batch_size, sequence_length, vocab]
             present.{i}.key / .value [batch_size, kv_heads, total_sequence_length, head_dim]

transformers 5.x keeps the cache in `Cache` objects; `KVCacheModule` takes flat tensors, builds a
`DynamicCache` from them and returns the updated cache flat again, which is what the exporter needs. The
model's facts a runner needs (layers, kv heads, head size, positions, eos) are written into the ONNX file's
metadata under `compress.decoder`."""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import InputError
from compress.onnx.cache import (  # noqa: F401  (the contract, re-exported for callers of this module)
    CACHE_FAMILIES, METADATA_KEY, PAST, PRESENT, DIM_NAMES, CacheLayout, cache_layout, read_layout, layout_of, is_cache_graph, default_input, positions_from_mask,
)

log = logging.getLogger(__name__)

class KVCacheModule(nn.Module):
    """A causal LM as a function of flat tensors: (input_ids, attention_mask, position_ids, *past) ->
    (logits, *present), the past and present as key, value per layer."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.num_layers = layout.num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        flat: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _example(layout: CacheLayout, device: torch.device, dtype: torch.dtype, batch: int = 2, seq: int = 3,
             past: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing: every dynamic dim above 1 (torch.export specialises 0 and 1)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(layout.vocab_size, 2), (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    pos = torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, layout.num_kv_heads, past, layout.head_dim, generator=g).to(device=device, dtype=dtype)
          for _ in range(2 * layout.num_layers)]
    return (ids, mask, pos, *kv)


def _rename_dims(model: onnx.ModelProto) -> None:
    """Give the graph's symbolic dims the names ORT's and optimum's decoders use."""
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in DIM_NAMES:
                d.dim_param = DIM_NAMES[d.dim_param]


def export_decoder(model: nn.Module, path: Path, *, opset: int = 18, optimize: bool = True) -> Path:
    """Export a causal LM with its KV cache to `path` (atomically) with the dynamo exporter; returns the path.

    The model is exported in eval mode and left in the mode it was in."""
    from compress.onnx.export import EXPORTER_LOGGERS, OnnxExportError, _strip_node_metadata, _summary
    from compress.onnx.runtime import atomic_onnx_path, load_model, quiet_logs, write_proto

    layout = cache_layout(model.config)
    p = next(model.parameters())
    args = _example(layout, p.device, p.dtype)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    total = torch.export.Dim("total")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers))}
    wrapper = KVCacheModule(model, layout).eval()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), quiet_logs(*EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                    input_names=["input_ids", "attention_mask", "position_ids", *layout.past_names()],
                    output_names=["logits", *layout.present_names()], optimize=optimize, verbose=False, report=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; we name the model and the first line
        raise OnnxExportError(f"torch.onnx.export (KV cache) failed for {type(model).__name__}: {_summary(exc)}") from exc
    finally:
        model.train(was_training)
    _strip_node_metadata(program)
    path = Path(path)
    with atomic_onnx_path(path) as tmp:
        program.save(tmp)
        proto = load_model(tmp)
        _rename_dims(proto)
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(asdict(layout))})
        write_proto(proto, tmp)
    log.info("exported %s with KV cache (%d layers, %d kv heads, head %d) to %s", type(model).__name__,
             layout.num_layers, layout.num_kv_heads, layout.head_dim, path)
    return path


# ---------------------------------------------------------------------------------------------- parity


@dataclass
class GenerationParity:
    """Greedy tokens of PyTorch `generate` and of the ONNX decoder, per prompt."""

    reference: list[list[int]]
    onnx: list[list[int]]

    @property
    def ok(self) -> bool:
        return self.reference == self.onnx

    @property
    def token_agreement(self) -> float:
        pairs = [(a, b) for r, o in zip(self.reference, self.onnx) for a, b in zip(r, o)]
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def generation_parity(model: nn.Module, path: Path, prompts: list[list[int]], *, new_tokens: int = 20,
                      threads: int | None = None) -> GenerationParity:
    """Greedy generation of `new_tokens` per prompt with HF `generate` (KV cache) and with the ONNX decoder."""
    from compress.generate import OnnxDecoder

    dec = OnnxDecoder(path, threads=threads)
    ref, got = [], []
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=next(model.parameters()).device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            ref.append(out[0, len(prompt):].tolist())
            got.append(dec.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None))
    finally:
        model.train(was_training)
    return GenerationParity(ref, got)


@dataclass
class DecoderExportCheck:
    """What the export pass checks on a decoder with a cache: logits of a scoring batch (prefill) and greedy
    generation token for token."""

    max_abs_diff: float
    cosine: float
    generation: GenerationParity
    logits_ok: bool

    @property
    def ok(self) -> bool:
        return self.logits_ok and self.generation.ok


def check_decoder(model: nn.Module, path: Path, inputs: dict[str, torch.Tensor], *, atol: float, min_cosine: float,
                  new_tokens: int = 20, prompts: int = 4, prompt_len: int = 8) -> DecoderExportCheck:
    """Logits parity of the ONNX decoder against PyTorch on `inputs` (padded positions left out), and greedy
    generation parity for `new_tokens` on up to `prompts` prompts cut from the rows of `inputs`."""
    from compress.onnx.parity import cosine_similarity, valid_positions
    from compress.onnx.runtime import make_session, run_session

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    got = next(iter(run_session(make_session(path), {"input_ids": ids, "attention_mask": mask}).values()))
    a, b = valid_positions(got.astype(np.float32), mask.cpu().numpy()), valid_positions(ref, mask.cpu().numpy())
    diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
    cos = cosine_similarity(a, b)
    rows = [ids[i][mask[i].bool()].tolist()[:prompt_len] for i in range(min(prompts, len(ids)))]
    rows = [r for r in rows if r] or [[0]]
    limit = cache_layout(model.config).max_positions
    n = min(new_tokens, limit - max(map(len, rows))) if limit else new_tokens
    gen = generation_parity(model, path, rows, new_tokens=max(n, 1))
    return DecoderExportCheck(diff, cos, gen, logits_ok=np.isfinite(diff) and diff <= atol and cos >= min_cosine)


# ---------------------------------------------------------------------------------------------- evaluation
DECODE_TOKENS = 32  # decode steps timed per round by evaluate


def top1_agreement(batches: list[dict[str, torch.Tensor]], a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Per-step top-1 agreement of two models' next-token predictions at the positions the labels count."""
    same = total = 0
    for batch, x, y in zip(batches, a, b):
        valid = batch["labels"][:, 1:] != -100
        same += int((x[:, :-1].argmax(-1) == y[:, :-1].argmax(-1))[valid].sum())
        total += int(valid.sum())
    return same / max(total, 1)


def causal_lm_stats(evaluation: Any, models: list[Any], outputs: dict[str, list[torch.Tensor]],
                    batches: list[dict[str, torch.Tensor]], target: Any, *, latency: bool = True) -> None:
    """Add to each evaluated decoder's stats: against the fp32 student (when it was evaluated too) the per-step
    top-1 agreement and the relative perplexity increase; for graphs with a KV cache, prefill ms of a
    `target.seq_len` prompt and decode tokens/s (batch 1, `target.threads`)."""
    from compress.generate import measure_decoding

    fp32 = next((m for m in models if m.precision == "fp32"), None)
    base = evaluation.models.get(fp32.name) if fp32 is not None else None
    for m in models:
        stats = evaluation.models[m.name]
        if base is not None and m.name != fp32.name:
            stats["top1_agreement_fp32"] = top1_agreement(batches, outputs[m.name], outputs[fp32.name])
            stats["perplexity_increase"] = stats["perplexity"] / base["perplexity"] - 1.0
        layout = read_layout(m.path)
        if not latency or layout is None:
            continue
        if layout.max_positions is not None and target.seq_len + DECODE_TOKENS > layout.max_positions:
            raise InputError(f"target.seq_len: a {target.seq_len}-token prompt + {DECODE_TOKENS} decode steps exceed "
                             f"the model's {layout.max_positions} positions; lower target.seq_len")
        timing = measure_decoding(m.path, target.seq_len, DECODE_TOKENS, threads=target.threads,
                                  provider=target.provider)
        stats.update(prefill_ms=timing["prefill_ms"], decode_tokens_per_s=timing["decode_tokens_per_s"])
