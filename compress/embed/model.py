"""Sentence embeddings in PyTorch: pooling over the valid tokens, an optional linear projection, L2
normalisation. The same modules run in training (the distillation objective), in the exported ONNX graph
(`SentenceEncoder` is what export traces: output `sentence_embedding`) and in evaluation (the teacher)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from compress.embed.st import SentenceSpec, load_dense, read_spec
from compress.tasks import mean_pool

OUTPUT = "sentence_embedding"  # the ONNX output name, as sentence-transformers' own ONNX exports call it


def pool(h: Tensor, mask: Tensor | None, mode: str) -> Tensor:
    """[batch, seq, dim] token states -> [batch, dim]: the mean or max over the tokens whose attention
    mask is 1, or the first ([CLS]) token. Padding never changes the result."""
    if mode == "cls":
        return h[:, 0]
    if mode == "mean":  # the one masked mean of the project (relation terms, feature-extraction scores)
        return mean_pool(h, mask)
    if mode == "max":
        if mask is None:
            return h.amax(1)
        return h.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(h.dtype).min).amax(1)
    raise ValueError(f"unknown pooling mode {mode!r}")


class SentenceHead(nn.Module):
    """Token states -> the sentence vector of `spec`: pool, project (when `dense` is given), normalise."""

    def __init__(self, spec: SentenceSpec, dense: nn.Linear | None = None):
        super().__init__()
        self.mode, self.normalize = spec.pooling, spec.normalize
        self.dense = dense

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        e = pool(h, mask, self.mode)
        if self.dense is not None:
            e = self.dense(e)
        if self.normalize:
            e = nn.functional.normalize(e, p=2.0, dim=-1)
        return e

    def spec(self, dim: int, max_seq_length: int | None = None) -> SentenceSpec:
        """The SentenceSpec to save this head with, for a transformer of width `dim`."""
        d = self.dense
        return SentenceSpec(self.mode, self.normalize, dim, d.in_features if d is not None else None,  # type: ignore[arg-type]
                            d.out_features if d is not None else None, max_seq_length)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder and its SentenceHead: forward(input_ids, attention_mask, token_type_ids) ->
    the sentence embeddings [batch, out_dim]. `config` is the encoder's (export reads its limits)."""

    def __init__(self, model: nn.Module, head: SentenceHead):
        super().__init__()
        self.model, self.head = model, head
        self.config = getattr(model, "config", None)

    @classmethod
    def from_folder(cls, model: nn.Module, folder: str | Path, pooling: str | None = None) -> SentenceEncoder:
        spec = read_spec(folder, pooling)
        return cls(model, SentenceHead(spec, load_dense(folder, spec)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        kw = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        out = self.model(input_ids=input_ids, **kw)
        return self.head(out.last_hidden_state, attention_mask)
