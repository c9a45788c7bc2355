"""Sentence-embedding students (docs/embeddings.md): the sentence-transformers folder format (st.py), pooling
and projection in PyTorch and ONNX (model.py), retrieval metrics (metrics.py), and the hooks the built-in
passes call (hooks.py)."""
from __future__ import annotations

from compress.embed.metrics import embedding_scores
from compress.embed.model import OUTPUT, SentenceEncoder, SentenceHead, pool
from compress.embed.st import SentenceSpec, is_st_folder, load_dense, read_spec, write_st_files

__all__ = ["OUTPUT", "SentenceEncoder", "SentenceHead", "SentenceSpec", "embedding_scores", "is_st_folder",
           "load_dense", "pool", "read_spec", "write_st_files"]
