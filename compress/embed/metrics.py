"""What a search user checks before swapping the teacher's embeddings for the student's, on held-out text:

- `fidelity` (= `cosine`): mean cosine between the student's and the teacher's embedding of each text (the
  student can replace the teacher's vectors in an existing index only when this is near 1);
- `recall_at_10` (= `retrieval_agreement`, the feature-extraction task's main metric): for each text as a
  query over the others, the share of the teacher's 10 nearest neighbours the student also returns in its 10;
- `spearman`: rank correlation of all pairwise similarities, student vs teacher;
- `knn_accuracy`: where the texts are labelled, leave-one-out k-NN classification accuracy (k = 10,
  similarity-weighted votes) of the embeddings being scored."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

K = 10
MIN_RETRIEVAL_TEXTS = 20  # below this, recall@10 over the other texts says little: a retrieval gate refuses it


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    return np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < len(sim) - 1 else np.argsort(-sim, axis=1)[:, :k]


def recall_at_k(student: np.ndarray, teacher: np.ndarray, k: int = K) -> float:
    """Mean share of the teacher's k nearest neighbours (cosine, self excluded) the student also ranks in its k."""
    n = len(student)
    if n < 2:
        return 1.0
    k = min(k, n - 1)
    s, t = _unit(student), _unit(teacher)
    ns, nt = _neighbours(s @ s.T, k), _neighbours(t @ t.T, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ns, nt)]))


def pairwise_spearman(student: np.ndarray, teacher: np.ndarray, max_texts: int = 2000) -> float:
    """Spearman correlation of the cosine similarities of every pair of texts (the first `max_texts`)."""
    from scipy.stats import spearmanr

    s, t = _unit(student[:max_texts]), _unit(teacher[:max_texts])
    if len(s) < 3:
        return 1.0
    iu = np.triu_indices(len(s), 1)
    rho = spearmanr((s @ s.T)[iu], (t @ t.T)[iu]).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def knn_accuracy(emb: np.ndarray, labels: Sequence[Any], k: int = K) -> float | None:
    """Leave-one-out k-NN accuracy with similarity-weighted votes; None without two classes to tell apart."""
    y = np.asarray([str(v) for v in labels])
    if len(y) != len(emb) or len(set(y)) < 2 or len(y) < 3:
        return None
    k = min(k, len(y) - 1)
    e = _unit(emb)
    sim = e @ e.T
    nb = _neighbours(sim, k)
    classes, yi = np.unique(y, return_inverse=True)
    votes = np.zeros((len(y), len(classes)))
    rows = np.repeat(np.arange(len(y)), k)
    np.add.at(votes, (rows, yi[nb].reshape(-1)), np.take_along_axis(sim, nb, 1).reshape(-1) + 1.0)
    return float((votes.argmax(1) == yi).mean())


def embedding_scores(student: np.ndarray, teacher: np.ndarray, labels: Sequence[Any] | None = None) -> dict[str, float]:
    """The metrics above for embeddings [n, dim] of the same n texts (labels: one per text, or None)."""
    student, teacher = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {student.shape} and teacher embeddings {teacher.shape} differ in shape")
    cos = float(np.mean(np.sum(_unit(student) * _unit(teacher), -1)))
    rec = recall_at_k(student, teacher)
    out = {"retrieval_agreement": rec, "recall_at_10": rec, "fidelity": cos, "cosine": cos,
           "spearman": pairwise_spearman(student, teacher)}
    if labels is not None:
        acc = knn_accuracy(student, labels)
        if acc is not None:
            out["knn_accuracy"] = acc
    return out
