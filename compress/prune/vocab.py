"""Vocabulary trimming for encoders: keep the embedding rows of the tokens the training texts use (plus the special
tokens and an optional list) and rewrite the fast tokenizer to match.

The choice: the tokenizer is rewritten, the graph is not. The trimmed WordPiece vocabulary still holds every
original token, so any text splits exactly as before. Kept tokens are numbered 0..K-1 (in their original order);
every token that was not kept gets id K, one extra embedding row that is a copy of the unknown token's row, so a
dropped token reaches the model as [UNK] does. Text whose tokens are all kept tokenizes to the same tokens and
the trimmed model computes what the original computed. The folder stays a plain HF folder (model +
tokenizer.json) that loads without compress, and the ONNX graph takes the new ids directly, with no lookup table
(which would be as long as the original vocabulary) in every exported graph.

Why a separate id K rather than [UNK]'s own id: tokenizers serialises a WordPiece vocabulary from its id -> token
table, which keeps one token per id. The tokenizer object returned here writes its own tokenizer.json on
`save_pretrained`, so compress keeps every dropped token; a copy re-saved by plain transformers keeps only one of
them at id K, and is still a valid tokenizer ([UNK] keeps its own id): kept text still splits identically, and a
word with dropped pieces is then split into kept pieces or becomes [UNK].

`fallback="split"` (the other choice) keeps no shared row: the trimmed WordPiece vocabulary holds only the kept
tokens, so a word with a dropped piece is split by the tokenizer itself into kept pieces (WordPiece's greedy
longest match over the smaller vocabulary); `kept_token_ids(char_pieces=True)`
adds the single-character pieces (`c`, `##c`) of every character of the texts, so only a word with a character
the texts never had becomes [UNK]. Text whose tokens are all kept still splits exactly as before (the longest
match in the full vocabulary is kept, and no kept piece is longer). The model has K rows, the id map is the kept
ids, and the tokenizer is an ordinary one that plain transformers saves and reloads unchanged. On the 4-layer
all-MiniLM student of configs/minilm-embeddings.yaml it keeps more of the student's quality at the same size
than the shared [UNK] row (docs/pruning.md).

`max_tokens` keeps the most frequent tokens of the texts only (the special tokens, `extra` and the character
pieces come on top): a size budget for the table.

WordPiece only (BERT, DistilBERT, MiniLM...): BPE and Unigram tokenizers refer to token ids in their merges /
scores, so several tokens cannot share an id there: trimming them is an InputError naming the tokenizer model.
"""
from __future__ import annotations

import collections
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from compress.errors import InputError
from compress.prune.plan import KeepPlan

log = logging.getLogger(__name__)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("vocabulary trimming needs a fast tokenizer (tokenizers library); "
                         f"got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def kept_token_ids(tokenizer: Any, texts: Iterable[str], extra: Iterable[str | int] = (), *,
                   max_tokens: int | None = None, char_pieces: bool = False) -> list[int]:
    """Original ids to keep: the tokens of `texts` (as the tokenizer splits them; with `max_tokens`, only that many,
    the most frequent first, ties to the lower id), the special tokens, `extra` (tokens or ids) and, with
    `char_pieces`, the single-character pieces (`c` and `##c`) of every character of the normalised texts that
    the vocabulary has (what fallback "split" needs to spell any word of such characters)."""
    kept: set[int] = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    counts: collections.Counter[int] = collections.Counter()
    chars: set[str] = set()
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    batch: list[str] = []
    n = 0

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            counts.update(ids)
        if char_pieces:
            for text in batch:
                chars.update(normalizer.normalize_str(text) if normalizer is not None else text)

    for text in texts:
        batch.append(text)
        n += 1
        if len(batch) == 512:
            flush()
            batch = []
    if batch:
        flush()
    if n == 0:
        raise InputError("vocabulary trimming: no training texts to collect tokens from")
    ranked = sorted((i for i in counts if i not in kept), key=lambda i: (-counts[i], i))  # kept: the specials
    kept.update(ranked if max_tokens is None else ranked[:max_tokens])
    vocab = tokenizer.get_vocab()
    if char_pieces:
        prefix = _continuing_prefix(tokenizer)
        kept.update(vocab[p] for c in chars if not c.isspace() for p in (c, prefix + c) if p in vocab)
    for item in extra:
        if isinstance(item, int):
            kept.add(item)
        elif item in vocab:
            kept.add(vocab[item])
        else:
            raise InputError(f"vocabulary trimming: extra token '{item}' is not in the tokenizer's vocabulary")
    return sorted(kept)


def _continuing_prefix(tokenizer: Any) -> str:
    return str(_backend_json(tokenizer).get("model", {}).get("continuing_subword_prefix") or "##")


def dropped_token_rows(fallback: str) -> int:
    """Embedding rows trimming adds besides the kept ones: 1 for fallback "unk" (id K, which every dropped token
    shares), 0 for "split"."""
    if fallback not in ("unk", "split"):
        raise InputError(f"vocabulary trimming: fallback '{fallback}' is not unk or split")
    return int(fallback == "unk")


def trim_tokenizer(tokenizer: Any, kept: list[int], fallback: str = "unk") -> Any:
    """A fast tokenizer that numbers kept tokens 0..len(kept)-1. fallback "unk": it splits text as `tokenizer`
    does and a token not kept gets id len(kept) (the shared row); "split": its vocabulary is the kept tokens
    only, so a word with a dropped piece splits into kept pieces. WordPiece only (see the module docstring)."""
    from transformers import AutoTokenizer

    data = _backend_json(tokenizer)
    model = data.get("model", {})
    if model.get("type") != "WordPiece":
        raise InputError(f"vocabulary trimming: tokenizer model '{model.get('type')}' is not supported (WordPiece "
                         "only: BERT-style encoders); leave vocab trimming off for this model")
    unk = model.get("unk_token")
    vocab: dict[str, int] = model["vocab"]
    if unk not in vocab or vocab[unk] not in set(kept):
        raise InputError("vocabulary trimming: the tokenizer has no unknown token to map dropped tokens to")
    new_id = {old: new for new, old in enumerate(kept)}
    dropped_id = len(kept)  # the extra row: a copy of [UNK]'s (see the module docstring)
    unk_new = new_id[vocab[unk]]
    if dropped_token_rows(fallback):
        model["vocab"] = {tok: new_id.get(old, dropped_id) for tok, old in vocab.items()}
    else:
        model["vocab"] = {tok: new_id[old] for tok, old in vocab.items() if old in new_id}
    for added in data.get("added_tokens") or []:
        if added["id"] not in new_id:
            raise InputError(f"vocabulary trimming: added token '{added['content']}' must be kept")
        added["id"] = new_id[added["id"]]
    _remap_ids(data.get("post_processor"), new_id)
    if data.get("padding") and "pad_id" in data["padding"]:
        data["padding"]["pad_id"] = new_id.get(data["padding"]["pad_id"], unk_new)
    text = json.dumps(data, ensure_ascii=False)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        _write_tokenizer_json(Path(tmp), text)
        trimmed = AutoTokenizer.from_pretrained(tmp)
    original_save = trimmed.save_pretrained

    def save_pretrained(save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        out = original_save(save_directory, *args, **kwargs)
        _write_tokenizer_json(Path(save_directory), text)
        return out

    # tokenizers serialises a WordPiece vocabulary from its id -> token table, which keeps one token per id: the
    # dropped tokens (all at id K) would be lost, so this object writes its tokenizer.json itself
    trimmed.save_pretrained = save_pretrained
    return trimmed


def _write_tokenizer_json(folder: Path, text: str) -> None:
    (folder / "vocab.txt").unlink(missing_ok=True)
    tmp = folder / "tokenizer.json.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(folder / "tokenizer.json")


def _remap_ids(node: Any, new_id: dict[int, int]) -> None:
    """Special-token ids in a post-processor (TemplateProcessing's special_tokens, BertProcessing's cls/sep)."""
    if isinstance(node, dict):
        if node.get("type") == "Sequence":
            for p in node.get("processors", []):
                _remap_ids(p, new_id)
        for entry in (node.get("special_tokens") or {}).values():
            entry["ids"] = [new_id[i] for i in entry.get("ids", [])]
        for key in ("cls", "sep"):
            if isinstance(node.get(key), list) and len(node[key]) == 2:
                node[key][1] = new_id[node[key][1]]


def trim_model(model: nn.Module, kept: list[int], unk_id: int, fallback: str = "unk") -> nn.Module:
    """`model` with the embedding rows `kept` (new ids 0..K-1) and, for fallback "unk", one more row, id K, a copy
    of the row of `unk_id` (an original id, kept), where the trimmed tokenizer sends every token that was not
    kept."""
    from compress.prune.shrink import shrink

    if unk_id not in kept:
        raise InputError("vocabulary trimming: the unknown token must be kept")
    small = shrink(model, KeepPlan(vocab=kept))
    if dropped_token_rows(fallback):
        add_dropped_token_row(small, kept, unk_id)
    return small


def add_dropped_token_row(model: nn.Module, kept: list[int], unk_id: int) -> None:
    """The extra row of fallback "unk" on a model whose vocabulary is already shrunk to `kept`: id K = len(kept),
    where the trimmed tokenizer sends every dropped token, a copy of the row of `unk_id` (an original id, kept)."""
    import torch

    from compress.models import get_adapter
    from compress.prune.shrink import word_embedding

    model.resize_token_embeddings(len(kept) + 1, mean_resizing=False)
    emb = word_embedding(get_adapter(model))
    with torch.no_grad():
        emb.weight[len(kept)] = emb.weight[kept.index(unk_id)]


def trim_vocab(model: nn.Module, tokenizer: Any, texts: Iterable[str], extra: Iterable[str | int] = (), *,
               fallback: str = "unk", max_tokens: int | None = None) -> tuple[nn.Module, Any, list[int]]:
    """(trimmed model, trimmed tokenizer, kept original ids) for `texts` (see the module docstring). The model
    has len(kept) + 1 embedding rows with fallback "unk", len(kept) with "split"."""
    kept = kept_token_ids(tokenizer, texts, extra, max_tokens=max_tokens, char_pieces=fallback == "split")
    new_tok = trim_tokenizer(tokenizer, kept, fallback)
    return trim_model(model, kept, tokenizer.unk_token_id, fallback), new_tok, kept


def save_trimmed(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """Save a trimmed model and tokenizer atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
