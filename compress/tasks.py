"""One table of tasks: per task the Hugging Face auto class, the synthetic inputs used for export and latency, the
ONNX output name, what the labels are, the quality metric (and how it is scored), and which distillation terms
apply (logits or features). Config, loading, collation, export, evaluation and the CLI read this table; nothing
else keys behaviour on a task name."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from compress.errors import InputError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of positions no metric or loss counts (padding, special tokens, non-first sub-words)

Labels = Literal["class", "token-class", "next-token", "none"]
Modality = Literal["text", "image"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hf_task: str  # the task name optimum's TasksManager knows (its synonyms table maps it to an auto class)
    modality: Modality
    output: str  # the one output of the exported ONNX graph (and the model output field it comes from)
    labels: Labels  # class: one class per example; token-class: one per word; next-token: the text; none: unlabelled
    metric: str  # the main quality metric evaluate reports and the quality gate reads
    higher_is_better: bool
    distill_terms: Literal["logits", "features"]  # logit KD on the head's output, or feature (embedding) terms
    score: Callable[..., dict[str, float]]  # (batches, student outputs, teacher outputs) -> metrics and fidelity

    @property
    def has_classes(self) -> bool:
        """Whether the model has a classification head sized by the data's label set."""
        return self.labels in ("class", "token-class")

    def auto_class(self) -> Any:
        from optimum.exporters.tasks import TasksManager

        return TasksManager.get_model_class_for_task(TasksManager.map_from_synonym(self.hf_task), framework="pt")

    def synthetic_inputs(self, config: Any = None, *, batch_size: int, seq_len: int = 16, image_size: int | None = None,
                         seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of the model's shape with no data: token ids (all positions attended) for text, normal pixels
        for images; sizes from the model's HF `config` where it has them."""
        vocab = int(getattr(config, "vocab_size", 0) or 100)
        size = image_size or int(getattr(config, "image_size", 0) or 224)
        channels = int(getattr(config, "num_channels", 0) or 3)
        return synthetic_inputs(self.modality, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab,
                                image_size=size, channels=channels, seed=seed)


def synthetic_inputs(modality: str, *, batch_size: int, seq_len: int = 16, vocab_size: int = 100,
                     image_size: int = 224, channels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """The one synthetic-input builder (export without data, latency, `compress bench`)."""
    rng = np.random.default_rng(seed)
    if modality == "image":
        return {"pixel_values": rng.standard_normal((batch_size, channels, image_size, image_size)).astype(np.float32)}
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ---------------------------------------------------------------------------------------------- scoring
def _argmax_agreement(batches: Sequence[dict[str, torch.Tensor]], s_out: Sequence[torch.Tensor],
                      t_out: Sequence[torch.Tensor], per_token: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, student predictions, teacher predictions) flattened over the positions that count."""
    import torch

    labels, preds, tpreds = [], [], []
    for b, s, t in zip(batches, s_out, t_out):
        y = b["labels"]
        keep = y != IGNORE_INDEX if per_token else torch.ones_like(y, dtype=torch.bool)
        labels.append(y[keep])
        preds.append(s.argmax(-1)[keep])
        tpreds.append(t.argmax(-1)[keep])
    return tuple(torch.cat(x).numpy() for x in (labels, preds, tpreds))  # type: ignore[return-value]


def _classification(per_token: bool) -> Callable[..., dict[str, float]]:
    def score(batches: Sequence[dict[str, torch.Tensor]], s_out: Sequence[torch.Tensor],
              t_out: Sequence[torch.Tensor]) -> dict[str, float]:
        from sklearn.metrics import f1_score

        labels, preds, tpreds = _argmax_agreement(batches, s_out, t_out, per_token)
        if labels.size == 0:
            raise InputError("data.eval: no labelled positions to score (every label is ignored)")
        return {
            "accuracy": float((preds == labels).mean()),
            "f1_macro": float(f1_score(labels, preds, average="macro")),
            "fidelity": float((preds == tpreds).mean()),
        }

    return score


def _features(batches: Sequence[dict[str, torch.Tensor]], s_out: Sequence[torch.Tensor],
              t_out: Sequence[torch.Tensor]) -> dict[str, float]:
    import torch

    se = torch.cat([mean_pool(o, b.get("attention_mask")) for o, b in zip(s_out, batches)])
    te = torch.cat([mean_pool(o, b.get("attention_mask")) for o, b in zip(t_out, batches)])
    cos = torch.nn.functional.cosine_similarity(se, te, dim=-1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    agree = float((nearest(se) == nearest(te)).float().mean()) if len(se) > 1 else 1.0
    return {"retrieval_agreement": agree, "cosine": float(cos.mean()), "fidelity": float(cos.mean())}


def _next_token(batches: Sequence[dict[str, torch.Tensor]], s_out: Sequence[torch.Tensor],
                t_out: Sequence[torch.Tensor]) -> dict[str, float]:
    """Next-token perplexity on the label positions, and top-1 agreement with the teacher."""
    import torch

    nll, count, agree = 0.0, 0, 0
    for o, t, b in zip(s_out, t_out, batches):
        logits, labels = o[:, :-1], b["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        lp = torch.log_softmax(logits.float(), -1)
        tok = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok[valid].sum())
        count += int(valid.sum())
        agree += int((o[:, :-1].argmax(-1) == t[:, :-1].argmax(-1))[valid].sum())
    return {"perplexity": float(np.exp(nll / max(count, 1))), "fidelity": agree / max(count, 1)}


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token states over the valid (mask = 1) positions: a sentence embedding."""
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- the table
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sequence-classification", "text-classification", "text", "logits", "class", "accuracy", True,
                 "logits", _classification(per_token=False)),
        TaskSpec("token-classification", "token-classification", "text", "logits", "token-class", "accuracy", True,
                 "logits", _classification(per_token=True)),
        TaskSpec("feature-extraction", "feature-extraction", "text", "last_hidden_state", "none",
                 "retrieval_agreement", True, "features", _features),
        TaskSpec("causal-lm", "text-generation", "text", "logits", "next-token", "perplexity", False, "logits",
                 _next_token),
        TaskSpec("image-classification", "image-classification", "image", "logits", "class", "accuracy", True,
                 "logits", _classification(per_token=False)),
    )
}
TaskName = Literal["sequence-classification", "token-classification", "feature-extraction", "causal-lm",
                   "image-classification"]


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        raise InputError(f"model.task: '{name}' is not one of {', '.join(TASKS)}")
    return spec
