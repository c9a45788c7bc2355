"""Physical removal: `shrink(model, plan)` returns a new, smaller model that computes what the masked model
(`compress.prune.apply`) computes, with its config rewritten so that the folder reloads.

Everything goes through the model adapters (`compress.models`): the layers' q/k/v/o and up/gate/down come from
the adapter's views, the modules outside the layers that carry the hidden size from `units.hidden_sites`. A
removed attention or FFN sub-layer (an empty list in the plan) becomes `units.EmptyAttention` / `EmptyFFN`
(plus a `ZeroProjection` for an output projection outside it and an identity for a post-norm's LayerNorm): the
sub-layer then adds nothing and, for post-norm families, the layer skips its norm, as CoFi does.

After the weights, `finish_config` rewrites the config: when every layer has the same (non-zero) heads, kv
heads and FFN width, and the family's config can say the head size (LLaMA/Qwen2 store `head_dim`; elsewhere
head size = hidden / heads must still hold), the plain family config is rewritten and the folder loads with
plain transformers. Otherwise the model becomes a compress-registered type (`compress.prune.reload`) with
per-layer sizes in its config.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from compress.models import get_adapter
from compress.prune import reload
from compress.prune.plan import KeepPlan
from compress.prune.surgery import check_plan, kept_kv_heads, layer_sizes, shrink_in_place, word_embedding

log = logging.getLogger(__name__)

__all__ = ["check_plan", "finish_config", "kept_kv_heads", "layer_sizes", "shrink", "shrink_in_place", "word_embedding"]


def shrink(model: nn.Module, plan: KeepPlan) -> nn.Module:
    """A new model with only what `plan` keeps (`model` is left untouched); its config is rewritten so the
    saved folder reloads: with plain transformers when the sizes are uniform and expressible, else as a
    compress-registered pruned type (see `compress.prune.reload` and docs/pruning.md)."""
    from compress.search.inherit import keep_layers

    check_plan(model, plan)
    adapter = get_adapter(model)
    head_dim, hidden = adapter.head_dim, adapter.hidden_size
    n = adapter.num_layers
    layers = list(range(n)) if plan.layers is None else [int(i) for i in plan.layers]
    new = keep_layers(model, layers) if layers != list(range(n)) else copy.deepcopy(model)
    position = {orig: i for i, orig in enumerate(layers)}
    local = KeepPlan(
        heads={position[int(k)]: list(v) for k, v in plan.heads.items() if int(k) in position},
        ffn={position[int(k)]: list(v) for k, v in plan.ffn.items() if int(k) in position},
        hidden=None if plan.hidden is None else list(plan.hidden),
        vocab=None if plan.vocab is None else list(plan.vocab),
    )
    with torch.no_grad():
        shrink_in_place(new, local)
    finish_config(new, head_dim=head_dim, hidden=hidden if plan.hidden is None else len(plan.hidden),
                  vocab=None if plan.vocab is None else len(plan.vocab))
    return new


def finish_config(model: nn.Module, *, head_dim: int, hidden: int, vocab: int | None) -> bool:
    """Rewrite `model.config` after `shrink_in_place`. Returns True when the plain family config could express
    the sizes (the folder loads without compress), False when the model became a compress pruned type."""
    adapter = get_adapter(model)
    sizes = layer_sizes(model)
    cfg, fields = model.config, adapter.config_fields
    if vocab is not None:
        setattr(cfg, fields["vocab_size"], vocab)
    heads = {s["heads"] for s in sizes}
    kvs = {s["kv_heads"] for s in sizes}
    ffns = {s["ffn"] for s in sizes}
    has_head_dim = fields.get("head_dim") is not None
    uniform = len(heads) == 1 and len(kvs) == 1 and len(ffns) == 1 and 0 not in heads and 0 not in ffns
    expressible = uniform and (has_head_dim or next(iter(heads)) * head_dim == hidden)
    if expressible and not reload.is_pruned_type(cfg):
        setattr(cfg, fields["hidden_size"], hidden)
        setattr(cfg, fields["num_heads"], next(iter(heads)))
        if fields["num_kv_heads"] != fields["num_heads"]:
            setattr(cfg, fields["num_kv_heads"], next(iter(kvs)))
        setattr(cfg, fields["intermediate_size"], next(iter(ffns)))
        if has_head_dim:
            setattr(cfg, fields["head_dim"], head_dim)
        return True
    reload.to_pruned_type(model, sizes, head_dim=head_dim, hidden=hidden)
    return False
