"""Where the prunable units of a model live, read through the model adapters (`compress.models`): the one place
that says which tensors carry the hidden size, which modules write into the residual stream, and which modules
replace a removed attention or FFN sub-layer. `shrink` (physical removal) and `apply` (masked forward) both
use it, so the pruned model and the masked model are defined on the same modules."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.models import ModelAdapter, in_features, is_conv1d, out_features


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm (any family's class: LlamaRMSNorm, Qwen2RMSNorm...)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass
class HiddenSites:
    """Everything outside the transformer layers that reads or writes the hidden size, plus the layer norms.

    - norms: every LayerNorm/RMSNorm of hidden width (embeddings, per-layer, final);
    - embeddings: nn.Embedding tables of hidden width (word, position, token type);
    - readers: projections outside the layers whose input is the hidden size (pooler, classifier, LM head);
    - writers: projections / convolutions outside the layers whose output is the hidden size (pooler dense,
      a classifier's dense, ViT's patch projection);
    - params: (module, name) of bare parameters whose last dimension is the hidden size (ViT cls_token,
      position_embeddings, mask_token).
    """

    hidden: int
    norms: list[nn.Module] = field(default_factory=list)
    embeddings: list[nn.Embedding] = field(default_factory=list)
    readers: list[nn.Module] = field(default_factory=list)
    writers: list[nn.Module] = field(default_factory=list)
    convs: list[nn.Module] = field(default_factory=list)
    params: list[tuple[nn.Module, str]] = field(default_factory=list)


def hidden_sites(adapter: ModelAdapter) -> HiddenSites:
    """The modules of `adapter.model` that carry the hidden size, found by shape outside the layers (the
    layers' own projections are read from the adapter's views). A head whose number of labels happens to equal
    the hidden size would be mistaken for a writer: the modules outside the layers must not have an output of
    hidden width that is not in hidden space."""
    hidden = adapter.hidden_size
    sites = HiddenSites(hidden)
    layer_modules = {id(m) for lv in adapter.layers for m in lv.module.modules()}
    for module in adapter.model.modules():
        if is_norm(module):
            w = getattr(module, "weight", None)
            if w is not None and tuple(w.shape) == (hidden,):
                sites.norms.append(module)
            continue
        if id(module) in layer_modules:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == hidden:
            sites.embeddings.append(module)
        elif is_projection(module):
            if in_features(module) == hidden:
                sites.readers.append(module)
            if out_features(module) == hidden:
                sites.writers.append(module)
        elif isinstance(module, nn.Conv2d) and module.out_channels == hidden:
            sites.convs.append(module)
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and p.shape[-1] == hidden and not isinstance(module, (nn.Embedding, nn.Linear)) \
                    and not is_projection(module) and not isinstance(module, nn.Conv2d):
                sites.params.append((module, name))
    return sites


# ---------------------------------------------------------------------------------------------------- empty sub-layers


class Absent(nn.Module):
    """A projection of width 0 (`weight` is a plain `[out, in]` tensor with a zero dimension, not a parameter:
    nothing is saved). The model adapter reads its shape, so a layer whose attention or FFN was removed still
    has its q/k/v/o or up/down at the family's paths and reports 0 heads or 0 neurons."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = torch.empty(out_features, in_features)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class ZeroProjection(Absent):
    """Stands in for the output projection of a removed sub-layer when that projection lives outside the
    replaced module (BERT's attention.output.dense, output.dense): zeros of width `out_features`, whatever
    its input."""

    def __init__(self, out_features: int):
        super().__init__(out_features, 0)


class EmptyAttention(nn.Module):
    """A removed attention sub-layer: returns `(zeros, None)` when the output projection was inside it (the
    sub-layer adds nothing to the residual stream), `(input, None)` when the output projection is outside
    (that one is a `ZeroProjection`). Zero-width q/k/v/o linears sit at the family's paths so the model
    adapter still sees the layer (with 0 heads)."""

    removed = True  # read by ModelAdapter.capture: no attention probabilities to record

    def __init__(self, zeros: bool):
        super().__init__()
        self.zeros = zeros

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        return (torch.zeros_like(hidden_states) if self.zeros else hidden_states), None


class EmptyFFN(nn.Module):
    """A removed FFN sub-layer: zeros when the down projection was inside it, else the input unchanged (the
    down projection outside is a `ZeroProjection` and ignores it)."""

    def __init__(self, zeros: bool):
        super().__init__()
        self.zeros = zeros

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(hidden_states) if self.zeros else hidden_states


def is_empty(module: nn.Module) -> bool:
    return isinstance(module, (EmptyAttention, EmptyFFN))
