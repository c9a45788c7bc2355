"""Helpers the built-in passes share: task-aware batching of a data split (shaped by the task table), example inputs."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compress.passes.base import PassContext
from compress.tasks import get_task, mean_pool

__all__ = ["first_split", "label_ids", "mean_pool", "model_inputs", "task_batches", "train_seed"]


def label_ids(ctx: PassContext) -> dict[Any, int] | None:
    """Data label -> class id, as the teacher was set up at load time (sorted labels of the data)."""
    if not get_task(ctx.run.model.task).has_classes:
        return None
    return ctx.data.label2id()


def task_batches(
    ctx: PassContext,
    split: str,
    preprocessor: Any,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int | None = None,
    limit: int | None = None,
    model: nn.Module | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `split` shaped for the run's task; `limit` caps the number of examples."""
    from compress.data import collate

    records = ctx.data.records(split)
    if limit is not None:
        records = _head(records, limit)
    task = get_task(ctx.run.model.task)
    length = max_length or ctx.run.model.max_length
    if task.labels == "next-token":
        return collate.causal_lm_batches(records, preprocessor, batch_size=batch_size, max_length=length,
                                         shuffle=shuffle, seed=seed)
    if task.labels == "token-class":
        return collate.token_batches(records, preprocessor, batch_size=batch_size, max_length=length,
                                     label2id=label_ids(ctx), shuffle=shuffle, seed=seed)
    if task.modality == "image":
        size: Any = preprocessor
        if preprocessor is None and model is not None:
            size = int(getattr(model.config, "image_size", 224))
        return collate.image_batches(records, size, batch_size=batch_size, label2id=label_ids(ctx),
                                     shuffle=shuffle, seed=seed)
    return collate.text_batches(records, preprocessor, batch_size=batch_size, max_length=length,
                                label2id=label_ids(ctx), shuffle=shuffle, seed=seed)


def _head(records: Any, n: int) -> Any:
    import dataclasses

    def cut(v: Any) -> Any:
        return v[:n] if isinstance(v, list) else v

    return dataclasses.replace(records, **{f.name: cut(getattr(records, f.name)) for f in dataclasses.fields(records)})


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its labels: what the model (and the ONNX graph) takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


def train_seed(cfg: Any, ctx: PassContext) -> int:
    """The seed a training pass trains with: its own `seed` when the config sets one, else the pass's seed
    derived from the run's seed and the pass label."""
    return int(cfg.seed) if "seed" in cfg.model_fields_set else ctx.seed


def first_split(ctx: PassContext, *splits: str) -> str | None:
    return next((s for s in splits if ctx.data.has(s)), None)
