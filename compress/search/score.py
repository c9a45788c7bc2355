"""Scores of a candidate student before training (higher = predicted better), all on the same batch:

- `diswot` (DisWOT, Dong et al. 2023): both models at initialisation (inherited or random weights), one batch.
  Relation term M_r: G = f f^T of the pooled final features (rows L2-normalised), ||G_T - G_S||_F^2 / B^2.
  Semantic term M_s: token-level Grad-CAM of each class logit on the last hidden states (the gradient averaged
  over tokens weighs the channels; ReLU of the weighted sum per token), the K maps of a sample L2-normalised, their
  K x K Gram per sample, squared Frobenius distance / K^2, averaged over samples. Score = -(M_r + M_s); for
  feature-extraction and causal LMs (no class logits) the relation term alone.
- `params`: the student's parameter count (the baseline every proxy must beat).
- `kd`: a zero-cost proxy: the distillation loss (`compress.distill.DistillObjective`, logit KL; the embedding
  term for feature extraction) on the batch after a few steps of the shared `Trainer`, negated.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.tasks import get_task, mean_pool

SCORES = ("diswot", "params", "kd")


@dataclass
class ScoreResult:
    score: float
    terms: dict[str, float] = field(default_factory=dict)


def _last_hidden(out: Any) -> torch.Tensor:
    hs = getattr(out, "hidden_states", None)
    if hs is not None:
        return hs[-1]
    return out.last_hidden_state


def _logits(out: Any, task: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, K] class logits (token classification: summed over the valid tokens); None without classes."""
    spec = get_task(task)
    if not spec.has_classes or getattr(out, "logits", None) is None:
        return None
    logits = out.logits
    if logits.dim() == 3:
        m = torch.ones(logits.shape[:2], device=logits.device) if mask is None else mask.to(logits.dtype)
        logits = (logits * m.unsqueeze(-1)).sum(1)
    return logits


def relation_gram(features: torch.Tensor) -> torch.Tensor:
    f = nn.functional.normalize(features.float(), dim=1)
    return f @ f.T


def relation_distance(g_t: torch.Tensor, g_s: torch.Tensor) -> float:
    b = g_t.shape[0]
    return float(((g_t - g_s) ** 2).sum() / (b * b))


def gradcam_gram(hidden: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, K, K]: per sample, the Gram of the K class Grad-CAM maps over tokens (each map L2-normalised)."""
    maps = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), hidden, retain_graph=True)
        weights = grad.float().mean(1, keepdim=True)  # [B, 1, d]: the channel weights of class k
        cam = torch.relu((weights * hidden.float()).sum(-1))  # [B, T]
        if mask is not None:
            cam = cam * mask.to(cam.dtype)
        maps.append(cam)
    m = nn.functional.normalize(torch.stack(maps, 1), dim=2)  # [B, K, T]
    return (m @ m.transpose(1, 2)).detach()


def semantic_distance(g_t: torch.Tensor, g_s: torch.Tensor) -> float:
    k = g_t.shape[1]
    return float(((g_t - g_s) ** 2).sum(dim=(1, 2)).mean() / (k * k))


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], task: str, semantic: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(relation Gram, semantic Gram or None) of `model` on `batch`."""
    from compress.onnx.export import forward_kwargs

    from compress.models import get_adapter

    mask = batch.get("attention_mask")
    model.eval()
    handle = None
    if semantic:  # the graph must reach the last hidden states even when the weights are frozen
        def needs_grad(module: nn.Module, args: Any, output: Any) -> Any:
            return output.requires_grad_(True) if isinstance(output, torch.Tensor) and output.is_floating_point() \
                and not output.requires_grad else output

        handle = get_adapter(model).embeddings.register_forward_hook(needs_grad)
    try:
        with torch.set_grad_enabled(semantic):
            out = model(**batch, **forward_kwargs(model, task), output_hidden_states=True)
            hidden = _last_hidden(out)
            rel = relation_gram(mean_pool(hidden.detach(), mask))
            logits = _logits(out, task, mask) if semantic else None
            sem = gradcam_gram(hidden, logits, mask) if logits is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return rel, sem


class DisWOT:
    """DisWOT scores against one teacher on one batch (the teacher's Grams computed once)."""

    def __init__(self, teacher: nn.Module, batch: dict[str, torch.Tensor], task: str):
        self.task = task
        self.semantic = get_task(task).has_classes and task not in ("feature-extraction", "causal-lm")
        self.batch = batch
        self.t_rel, self.t_sem = _forward(teacher, batch, task, self.semantic)

    def __call__(self, student: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> ScoreResult:
        s_rel, s_sem = _forward(student, batch if batch is not None else self.batch, self.task, self.semantic)
        terms = {"relation": relation_distance(self.t_rel, s_rel)}
        if self.semantic and self.t_sem is not None and s_sem is not None:
            terms["semantic"] = semantic_distance(self.t_sem, s_sem)
        return ScoreResult(-sum(terms.values()), terms)


def params_score(student: nn.Module) -> ScoreResult:
    n = sum(p.numel() for p in student.parameters())
    return ScoreResult(float(n), {"params": float(n)})


def kd_score(student: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]],
             score_batch: dict[str, torch.Tensor], task: str, *, steps: int, lr: float, seed: int) -> ScoreResult:
    """-(distillation loss on `score_batch` after `steps` optimizer steps on `batches`) of a copy of `student`."""
    from compress.distill.objective import DistillObjective, LossWeights, ObjectiveConfig
    from compress.train.trainer import StepOutput, TrainConfig, Trainer

    student = copy.deepcopy(student).train()
    for p in student.parameters():  # sliced from a frozen teacher
        p.requires_grad_(True)
    cfg = ObjectiveConfig(weights=LossWeights(logit=1.0, ce=0.0, hidden=0.0, embedding=1.0))
    objective = DistillObjective(student, teacher, cfg, task=task, where="search.kd")

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        out = objective(batch, model=model)
        return StepOutput(loss=out.total, terms=out.floats())

    def train_batches(epoch: int) -> Any:
        return iter(batches)

    before = _objective_loss(objective, score_batch)
    if steps > 0:
        tcfg = TrainConfig(steps=steps, epochs=None, lr=lr, warmup_ratio=0.0, scheduler="constant",
                           batch_size=int(next(iter(batches[0].values())).shape[0]),
                           seed=seed, bf16=False, log_every=max(1, steps))
        Trainer(student, tcfg, loss_fn=loss_fn, train_batches=train_batches, checkpoint_dir=None,
                extra_modules=objective.modules(), label="search-kd").train()
    after = _objective_loss(objective, score_batch)
    return ScoreResult(-after, {"kd_loss": after, "kd_loss_init": before})


def _objective_loss(objective: Any, batch: dict[str, torch.Tensor]) -> float:
    objective.student.eval()
    with torch.no_grad():
        loss = float(objective(batch).total)
    objective.student.train()
    return loss


def remap_ids(batch: dict[str, torch.Tensor], kept: list[int] | None) -> dict[str, torch.Tensor]:
    """`batch` for a student whose vocabulary was trimmed to `kept` (original ids, increasing;
    `compress.prune.vocab`): each id becomes its position in `kept`, an id not kept becomes len(kept) (the extra
    row every dropped token shares, as the trimmed tokenizer numbers them)."""
    if kept is None or "input_ids" not in batch:
        return batch
    unk_new = len(kept)
    table = torch.full((max(kept) + 1,), unk_new, dtype=torch.long)
    table[torch.as_tensor(kept)] = torch.arange(len(kept))
    ids = batch["input_ids"]
    new = torch.where(ids <= max(kept), table[ids.clamp(max=max(kept))], torch.full_like(ids, unk_new))
    return {**batch, "input_ids": new}
