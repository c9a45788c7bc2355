"""Batches of Records for the model: tokenised text (classification, token classification and causal LM) and
pixel tensors (image classification)."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compress.data.sources import Records, label_id
from compress.errors import InputError
from compress.tasks import IGNORE_INDEX

log = logging.getLogger(__name__)

# Normalisation when image_batches is given a size instead of an image processor (the ViT image processor's default).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def _order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise InputError(f"batch_size must be a positive number, not {batch_size}")


def _ensure_pad_token(tokenizer: Any) -> None:
    """Tokenizers without a pad token (GPT-2, LLaMA) pad with their end-of-sequence token."""
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise InputError("tokenizer: has neither a pad token nor an eos token to pad with; give it a pad_token")
        tokenizer.pad_token = eos
        log.info("tokenizer has no pad token; padding with its eos token %r", eos)


def _check_text_input(records: Records, tokenizer: Any, batch_size: int) -> None:
    if records.texts is None:
        raise InputError(f"{records.source or 'data'}: has no text column; set the data's text field")
    _check_batch_size(batch_size)
    _ensure_pad_token(tokenizer)


def _check_labels(records: Records, label2id: dict[Any, int] | None) -> bool:
    """Whether batches carry labels; fails now, not halfway through training, on a label the model does not know."""
    if label2id is None or records.labels is None:
        return False
    for label in set(records.labels):
        label_id(label2id, label)
    return True


def _labels_tensor(labels: list[Any], label2id: dict[Any, int]) -> torch.Tensor:
    return torch.tensor([label_id(label2id, label) for label in labels], dtype=torch.long)


def text_batches(
    records: Records,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    label2id: dict[Any, int] | None,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches padded to their longest row (truncated to `max_length`): input_ids, attention_mask,
    token_type_ids when the tokenizer makes them, and labels (class ids) when `label2id` is given and the data is labelled."""
    _check_text_input(records, tokenizer, batch_size)
    with_labels = _check_labels(records, label2id)
    order = _order(len(records.texts), shuffle, seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        texts = records.texts or []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            first = [texts[i] for i in idx]
            second = [records.text_pairs[i] for i in idx] if records.text_pairs is not None else None
            enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
            if with_labels:
                batch["labels"] = _labels_tensor([records.labels[i] for i in idx], label2id)  # type: ignore[index,arg-type]
            yield batch

    return batches()


def token_batches(
    records: Records,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    label2id: dict[Any, int] | None,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Token-classification batches. Each text is split into words on whitespace and tokenised word by word (a
    fast tokenizer); with labels (one per word), the first sub-token of a word carries the word's class id and
    the other sub-tokens, special tokens and padding carry IGNORE_INDEX."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("token-classification needs a fast tokenizer (it maps sub-tokens to words); "
                         "save the model with its tokenizer.json")
    _check_text_input(records, tokenizer, batch_size)
    words = [text.split() for text in records.texts]
    with_labels = label2id is not None and records.labels is not None
    if with_labels:  # fail now, not halfway through training
        for row, (ws, tags) in enumerate(zip(words, records.labels or [])):
            if not isinstance(tags, (list, tuple)) or len(tags) != len(ws):
                n = len(tags) if isinstance(tags, (list, tuple)) else "one"
                raise InputError(f"{records.source or 'data'}: row {row} has {len(ws)} words but {n} labels; "
                                 "give one label per whitespace-separated word")
            for tag in tags:
                label_id(label2id or {}, tag)
    order = _order(len(words), shuffle, seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([words[i] for i in idx], is_split_into_words=True, padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
            if with_labels:
                rows = []
                for j, i in enumerate(idx):
                    tags, previous, row = records.labels[i], None, []  # type: ignore[index]
                    for word in enc.word_ids(j):
                        row.append(IGNORE_INDEX if word is None or word == previous else label_id(label2id, tags[word]))  # type: ignore[arg-type]
                        previous = word
                    rows.append(row)
                batch["labels"] = torch.tensor(rows, dtype=torch.long)
            yield batch

    return batches()


def causal_lm_batches(
    records: Records,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Language-modelling batches: input_ids, attention_mask, and labels = input_ids with padding set to -100
    (the model shifts them). A tokenizer without a pad token gets its eos token as pad token."""
    _check_text_input(records, tokenizer, batch_size)
    order = _order(len(records.texts), shuffle, seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        texts = records.texts or []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
            yield batch

    return batches()


def to_pil(value: Any) -> Any:
    """One image (PIL image, array HxW / HxWxC / CxHxW, encoded bytes, or file path) as an RGB PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        with Image.open(value) as img:
            return img.convert("RGB")
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"image of shape {arr.shape}: expected HxW, HxWxC or CxHxW")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # floats in [0, 1]
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _pixels_from_size(images: list[Any], size: int) -> torch.Tensor:
    from PIL import Image

    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    out = []
    for img in images:
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        out.append(((arr - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).float()


def image_batches(
    records: Records,
    image_processor_or_size: Any,
    *,
    batch_size: int,
    label2id: dict[Any, int] | None,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Image-classification batches: pixel_values float [B, 3, H, W] and labels (when `label2id` is given and the
    data is labelled). Takes an HF image processor, or an int size (None: 224) to resize to size x size and
    normalise with IMAGE_MEAN / IMAGE_STD itself. Grey images become 3-channel."""
    if records.images is None:
        raise InputError(f"{records.source or 'data'}: has no image column; set the data's image field")
    _check_batch_size(batch_size)
    processor = image_processor_or_size
    if processor is None:
        processor = 224
    if isinstance(processor, bool) or (isinstance(processor, int) and processor <= 0):
        raise InputError(f"image size must be a positive int, not {processor!r}")
    if not isinstance(processor, int) and not callable(processor):
        raise InputError(f"image_batches needs an image processor or an int size, not a {type(processor).__name__}")
    with_labels = _check_labels(records, label2id)
    order = _order(len(records.images), shuffle, seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        images = records.images or []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            pils = [to_pil(images[i]) for i in idx]
            if isinstance(processor, int):
                pixels = _pixels_from_size(pils, processor)
            else:
                pixels = processor(images=pils, return_tensors="pt")["pixel_values"].float()
            batch = {"pixel_values": pixels}
            if with_labels:
                batch["labels"] = _labels_tensor([records.labels[i] for i in idx], label2id)  # type: ignore[index,arg-type]
            yield batch

    return batches()
