"""The tensor surgery behind `compress.prune.shrink`: plan checks, slicing projections / norms / embeddings, and
removing sub-layers, in place, through the model adapters. `shrink` (a new model + config rewrite) and the
reload types' skeletons (`compress.prune.reload`) both use `shrink_in_place`."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.errors import InputError
from compress.models import ModelAdapter, get_adapter, is_conv1d
from compress.models.base import get_path
from compress.prune.plan import KeepPlan
from compress.prune.units import Absent, EmptyAttention, EmptyFFN, ZeroProjection, hidden_sites, is_empty

log = logging.getLogger(__name__)

_Memo = dict[int, tuple[nn.Parameter, nn.Parameter]]


# ---------------------------------------------------------------------------------------------------- validation


def _check_indices(values: Any, limit: int, what: str, *, allow_empty: bool) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{what}: must be a list of integers, got {values!r}") from None
    if not out and not allow_empty:
        raise InputError(f"{what}: keeps nothing; keep at least one (sparsity must stay below 1)")
    if out != sorted(set(out)) or any(not 0 <= v < limit for v in out):
        raise InputError(f"{what}: must be increasing, distinct indices in 0..{limit - 1}, got {out[:12]}"
                         f"{'...' if len(out) > 12 else ''}")
    return out


def kept_kv_heads(heads: list[int], num_heads: int, num_kv_heads: int, what: str) -> list[int]:
    """The kv heads (groups) that stay with query heads `heads`; InputError unless every kept group keeps the
    same number of its query heads (the only layout a GQA attention can express)."""
    if not heads:
        return []
    group = num_heads // num_kv_heads
    per_group: dict[int, int] = {}
    for h in heads:
        per_group[h // group] = per_group.get(h // group, 0) + 1
    if len(set(per_group.values())) > 1:
        counts = ", ".join(f"group {g}: {n}" for g, n in sorted(per_group.items()))
        raise InputError(f"{what}: invalid GQA grouping: kept query heads per key/value group differ ({counts}; "
                         f"{group} query heads share each of the {num_kv_heads} kv heads); keep the same number "
                         "in every kept group, or drop whole groups")
    return sorted(per_group)


def check_plan(model: nn.Module, plan: KeepPlan) -> None:
    """InputError (one line naming the plan field) when `plan` does not fit `model`."""
    adapter = get_adapter(model)
    views = adapter.layers
    n = len(views)
    if plan.layers is not None:
        _check_indices(plan.layers, n, "plan.layers", allow_empty=False)
    for field_name, table in (("heads", plan.heads), ("ffn", plan.ffn)):
        for layer, kept in table.items():
            if not 0 <= int(layer) < n:
                raise InputError(f"plan.{field_name}: layer {layer} out of range 0..{n - 1}")
            lv = views[int(layer)]
            what = f"plan.{field_name}[{layer}]"
            if field_name == "heads":
                att = lv.attention
                kept = _check_indices(kept, att.num_heads, what, allow_empty=True)
                kept_kv_heads(kept, att.num_heads, att.num_kv_heads, what)
            else:
                _check_indices(kept, lv.ffn.intermediate_size, what, allow_empty=True)
    if plan.hidden is not None:
        _check_indices(plan.hidden, adapter.hidden_size, "plan.hidden", allow_empty=False)
    if plan.vocab is not None:
        if adapter.vocab_size is None:
            raise InputError(f"plan.vocab: model type '{adapter.family}' has no vocabulary to trim; "
                             "leave plan.vocab empty")
        _check_indices(plan.vocab, adapter.vocab_size, "plan.vocab", allow_empty=False)


# ---------------------------------------------------------------------------------------------------- tensors


def _set_param(module: nn.Module, name: str, value: torch.Tensor, memo: _Memo) -> None:
    """Replace parameter `name` by `value`; a parameter shared by several modules (tied embeddings and LM head)
    is replaced once and stays shared."""
    old = getattr(module, name)
    if id(old) in memo:
        new = memo[id(old)][1]
    else:
        new = nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad)
        memo[id(old)] = (old, new)
    setattr(module, name, new)


def _idx(indices: list[int], like: torch.Tensor | None = None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.as_tensor(indices, dtype=torch.long, device=device)


def select_out(module: nn.Module, indices: list[int], memo: _Memo) -> None:
    """Keep output features `indices` of an nn.Linear / Conv1D (or a placeholder)."""
    if isinstance(module, Absent):
        module.weight = torch.empty(len(indices), module.in_features)
        module.out_features = len(indices)
        return
    idx = _idx(indices, module.weight)
    if is_conv1d(module):
        _set_param(module, "weight", module.weight[:, idx], memo)
        module.nf = len(indices)
    else:
        _set_param(module, "weight", module.weight[idx], memo)
        module.out_features = len(indices)
    if getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias[idx], memo)


def select_in(module: nn.Module, indices: list[int], memo: _Memo) -> None:
    """Keep input features `indices` of an nn.Linear / Conv1D (or a placeholder)."""
    if isinstance(module, Absent):
        module.weight = torch.empty(module.out_features, len(indices))
        module.in_features = len(indices)
        return
    idx = _idx(indices, module.weight)
    if is_conv1d(module):
        _set_param(module, "weight", module.weight[idx], memo)
        module.nx = len(indices)
    else:
        _set_param(module, "weight", module.weight[:, idx], memo)
        module.in_features = len(indices)


def _select_norm(module: nn.Module, indices: list[int], memo: _Memo) -> None:
    idx = _idx(indices, module.weight)
    _set_param(module, "weight", module.weight[idx], memo)
    if getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias[idx], memo)
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = (len(indices),)


# ---------------------------------------------------------------------------------------------------- sub-layers

# attribute of an attention module -> what it holds after head removal (set only where the module has it)
_HEAD_ATTRS = {
    "num_heads": lambda h, kv, hd: h,
    "num_attention_heads": lambda h, kv, hd: h,
    "n_heads": lambda h, kv, hd: h,
    "n_head": lambda h, kv, hd: h,
    "num_key_value_heads": lambda h, kv, hd: kv,
    "num_key_value_groups": lambda h, kv, hd: h // kv,
    "all_head_size": lambda h, kv, hd: h * hd,
}


def _keep_heads(att: Any, heads: list[int], memo: _Memo) -> None:
    hd = att.head_dim
    kv_keep = kept_kv_heads(heads, att.num_heads, att.num_kv_heads, "heads")
    q_rows = [r for h in heads for r in range(h * hd, (h + 1) * hd)]
    kv_rows = [r for k in kv_keep for r in range(k * hd, (k + 1) * hd)]
    if att.fused_qkv:
        k0, v0 = att.qkv_slice("k").start, att.qkv_slice("v").start
        select_out(att.q, q_rows + [k0 + r for r in kv_rows] + [v0 + r for r in kv_rows], memo)
        if hasattr(att.module, "split_size"):
            att.module.split_size = len(q_rows)
    else:
        select_out(att.q, q_rows, memo)
        select_out(att.k, kv_rows, memo)
        select_out(att.v, kv_rows, memo)
    select_in(att.o, q_rows, memo)
    for name, value in _HEAD_ATTRS.items():
        if isinstance(getattr(att.module, name, None), int):
            setattr(att.module, name, value(len(heads), len(kv_keep), hd))


def _tail(path: str, prefix: str) -> str | None:
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, new)


def _found(layer: nn.Module, candidates: tuple[str, ...]) -> str:
    for path in candidates:
        try:
            if get_path(layer, path) is not None:
                return path
        except (AttributeError, IndexError):
            continue
    raise InputError(f"cannot find any of {candidates} in {type(layer).__name__}")


def _remove_sublayer(adapter: ModelAdapter, index: int, kind: str) -> None:
    """Replace layer `index`'s attention (`kind='attention'`) or FFN by an empty module (see the module doc)."""
    spec, layer = adapter.spec, adapter.layer_list[index]
    hidden = adapter.hidden_size
    if kind == "attention":
        module_path = _found(layer, spec.attn_module)
        inner = {"q": spec.q, "k": spec.k, "v": spec.v}
        out_paths, norm_paths = spec.o, spec.attn_norm
    else:
        module_path = _found(layer, spec.ffn_module)
        inner = {"up": spec.up, **({"gate": spec.gate} if spec.gate else {})}
        out_paths, norm_paths = spec.down, spec.ffn_norm
    out_path = _found(layer, out_paths)
    out_tail = _tail(out_path, module_path)
    inside = out_tail is not None
    empty: nn.Module = EmptyAttention(zeros=inside) if kind == "attention" else EmptyFFN(zeros=inside)
    for candidates in inner.values():  # zero-width projections where the adapter looks for them
        tail = _tail(_found(layer, candidates), module_path)
        if tail is not None and "." not in tail and not hasattr(empty, tail):
            empty.add_module(tail, Absent(0, hidden))
    if inside:
        if "." not in out_tail:
            empty.add_module(out_tail, Absent(hidden, 0))
        _replace(layer, module_path, empty)
    else:
        _replace(layer, module_path, empty)
        _replace(layer, out_path, ZeroProjection(hidden))
    if spec.norm_position == "post":  # the sub-layer is skipped with its norm (x, not LN(x + 0))
        _replace(layer, _found(layer, norm_paths), nn.Identity())


# ---------------------------------------------------------------------------------------------------- hidden, vocab


def _keep_hidden(adapter: ModelAdapter, kept: list[int], memo: _Memo) -> None:
    sites = hidden_sites(adapter)
    idx = _idx(kept)
    for lv in adapter.layers:
        att, ffn = lv.attention, lv.ffn
        for m in {id(x): x for x in (att.q, att.k, att.v)}.values():
            select_in(m, kept, memo)
        select_out(att.o, kept, memo)
        for m in (ffn.up, ffn.gate):
            if m is not None:
                select_in(m, kept, memo)
        select_out(ffn.down, kept, memo)
    for norm in sites.norms:
        _select_norm(norm, kept, memo)
    for emb in sites.embeddings:
        _set_param(emb, "weight", emb.weight[:, idx.to(emb.weight.device)], memo)
        emb.embedding_dim = len(kept)
    for m in sites.readers:
        select_in(m, kept, memo)
    for m in sites.writers:
        select_out(m, kept, memo)
    for conv in sites.convs:
        _set_param(conv, "weight", conv.weight[idx.to(conv.weight.device)], memo)
        if conv.bias is not None:
            _set_param(conv, "bias", conv.bias[idx.to(conv.bias.device)], memo)
        conv.out_channels = len(kept)
    for module, name in sites.params:
        p = getattr(module, name)
        _set_param(module, name, p[..., idx.to(p.device)], memo)


def word_embedding(adapter: ModelAdapter) -> nn.Embedding:
    """The token embedding table (vocab_size rows)."""
    emb, vocab = adapter.embeddings, adapter.vocab_size
    if isinstance(emb, nn.Embedding):
        return emb
    for m in emb.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == vocab:
            return m
    raise InputError(f"model type '{adapter.family}': no token embedding with {vocab} rows; cannot trim the vocabulary")


def _keep_vocab(adapter: ModelAdapter, kept: list[int], memo: _Memo) -> None:
    vocab = adapter.vocab_size
    emb = word_embedding(adapter)
    idx = _idx(kept, emb.weight)
    _set_param(emb, "weight", emb.weight[idx], memo)
    emb.num_embeddings = len(kept)
    if emb.padding_idx is not None:
        emb.padding_idx = kept.index(emb.padding_idx) if emb.padding_idx in kept else None
    layer_modules = {id(m) for lv in adapter.layers for m in lv.module.modules()}
    for m in adapter.model.modules():  # output projections over the vocabulary (LM heads, tied or not)
        if id(m) not in layer_modules and m is not emb and hasattr(m, "weight") and not isinstance(m, nn.Embedding) \
                and getattr(m, "out_features", None) == vocab:
            select_out(m, kept, memo)


# ---------------------------------------------------------------------------------------------------- shrink


def shrink_in_place(model: nn.Module, plan: KeepPlan) -> None:
    """Apply the head, FFN, hidden and vocabulary parts of `plan` to `model` itself (no layer removal: layer keys
    are the model's current layer indices). The config is not touched; see `finish_config`."""
    adapter = get_adapter(model)
    memo: _Memo = {}
    for lv in adapter.layers:
        heads = plan.heads.get(lv.index)
        if heads is not None and not is_empty(lv.attention.module):
            if len(heads) == 0:
                _remove_sublayer(adapter, lv.index, "attention")
            elif list(heads) != list(range(lv.attention.num_heads)):
                _keep_heads(lv.attention, list(heads), memo)
        neurons = plan.ffn.get(lv.index)
        if neurons is not None and not is_empty(lv.ffn.module):
            if len(neurons) == 0:
                _remove_sublayer(adapter, lv.index, "ffn")
            elif list(neurons) != list(range(lv.ffn.intermediate_size)):
                for m in (lv.ffn.up, lv.ffn.gate):
                    if m is not None:
                        select_out(m, list(neurons), memo)
                select_in(lv.ffn.down, list(neurons), memo)
    if plan.hidden is not None and list(plan.hidden) != list(range(adapter.hidden_size)):
        _keep_hidden(adapter, list(plan.hidden), memo)
    if plan.vocab is not None and list(plan.vocab) != list(range(adapter.vocab_size or 0)):
        _keep_vocab(adapter, list(plan.vocab), memo)


def layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: heads, kv_heads and ffn (intermediate width), read from the weights (0 for a removed
    sub-layer)."""
    out = []
    for lv in get_adapter(model).layers:
        att = lv.attention
        heads = 0 if is_empty(att.module) else att.num_heads
        kv = 0 if is_empty(att.module) else att.num_kv_heads
        ffn = 0 if is_empty(lv.ffn.module) else lv.ffn.intermediate_size
        out.append({"heads": heads, "kv_heads": kv, "ffn": ffn})
    return out
