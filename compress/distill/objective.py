"""The distillation objective: a student, its frozen teacher and a batch -> the weighted loss terms, by name.

    objective = DistillObjective(student, teacher, cfg, task="sequence-classification")
    out = objective(batch)                  # LossTerms: out.total (to minimise), out.terms {name: tensor}
    out = objective(batch, layers={2})      # the layer losses of student layer 2 only (OPTIMA's module)

For each batch it runs the teacher under `no_grad` (or reads its outputs from a `TeacherCache`) and the
student, capturing through the model adapters (compress.models) what the weights ask for: hidden states,
attention probabilities, attention sub-layer outputs, Q/K/V. The terms, named as `LossWeights`' fields:

- `logit`: the logit loss (`logit_loss`: forward/reverse KL, JSD, skew KL, skew reverse KL, TAID) through
  the one dispatch of compress.distill.losses (Triton kernel or PyTorch reference); for a causal LM the
  positions that predict a next token; for token classification (NER) each token that carries a label (a
  word's first sub-token); with `fused_lm_head`, through both LM heads in chunks of rows.
- `ce`: the student's own hard-label cross-entropy (the Hugging Face loss).
- `hidden`: MSE, 1 - cosine or TED filters between mapped hidden states (a trained `HiddenProjector` when the
  widths differ), averaged over the layer pairs.
- `attention`, `attention_output`: KL of attention probabilities, MSE of attention sub-layer outputs (KD for
  QAT), over the pairs of transformer layers.
- `relation`: MiniLMv2 Q/K/V self-relations of the last layers.
- `embedding`, `embedding_mse`, `contrastive` (feature extraction): 1 - cosine, squared distance and
  in-batch InfoNCE of the sentence embeddings: the teacher folder's pooling, projection and normalisation
  when it is a sentence-transformers model (`sentence`, compress.embed), else mean pooling.

`total = sum(weight * term)`. The objective owns trained modules of its own (`modules()`: the projections
and TED filters): hand them to the trainer as extra modules. With `logit_loss: taid` it owns the `TAID`
state (`objective.taid`); adapt it from the `logit` term after each optimizer step."""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from compress.distill import losses
from compress.distill.mapping import MappingConfig, Pair, dynamic_map
from compress.distill.teacher import TeacherCache
from compress.errors import InputError
from compress.passes.common import mean_pool, model_inputs
from compress.tasks import get_task

LogitLoss = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"]


class LossWeights(BaseModel):
    """The weight of each loss term (0 switches a term off); the terms are named as these fields."""

    model_config = ConfigDict(extra="forbid")
    logit: float = Field(1.0, ge=0, description="Logit distillation loss (`logit_loss`).")
    ce: float = Field(0.0, ge=0, description="Hard-label cross-entropy on the data's labels.")
    hidden: float = Field(1.0, ge=0, description="Hidden-state loss over the layer map (`hidden_loss`).")
    attention: float = Field(0.0, ge=0, description="KL between teacher and student attention probabilities (valid tokens).")
    attention_output: float = Field(0.0, ge=0, description="MSE between attention sub-layer outputs.")
    relation: float = Field(0.0, ge=0, description="MiniLMv2 Q/K/V self-relation KL between the last layers.")
    embedding: float = Field(1.0, ge=0, description="Feature extraction: 1 - cosine of the sentence embeddings.")
    embedding_mse: float = Field(0.0, ge=0, description="Feature extraction: squared distance of the sentence embeddings.")
    contrastive: float = Field(0.0, ge=0, description="Feature extraction: in-batch InfoNCE, the teacher's embedding "
                               "of the same sentence as the positive (`contrastive_temperature`).")


class ObjectiveConfig(BaseModel):
    """What the distillation objective computes (the distill pass's config has these fields)."""

    model_config = ConfigDict(extra="forbid")

    logit_loss: LogitLoss = Field("forward_kl", description="Which logit loss.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the logit loss.")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight (0: forward KL, 1: reverse KL).")
    alpha: float = Field(0.1, ge=0, le=1, description="Skew of skew KL / skew reverse KL.")
    hidden_loss: Literal["mse", "cosine", "ted"] = Field(
        "mse", description="Hidden-state loss: MSE, 1 - cosine, or MSE between TED task-aware filters of both sides "
        "(the teacher-side filter stays fixed; TED's first stage, training it on the task, is not done).")
    contrastive_temperature: float = Field(0.05, gt=0, description="Temperature of the in-batch contrastive term.")
    relation_heads: int | None = Field(None, gt=0, description="MiniLMv2 relation heads (default: the student's attention heads).")
    weights: LossWeights = Field(default_factory=LossWeights, description="Weight of each loss term.")
    student_dropout: bool | None = Field(
        None, exclude_if=lambda v: v is None,  # unset, it stays out of the cache keys of existing configs
        description="false: train the student with every dropout off (attention's too); a sentence-embedding "
        "student then matches the teacher's embeddings sooner (docs/embeddings.md). Unset/true: the model's own.")
    mapping: MappingConfig = Field(default_factory=MappingConfig, description="Which teacher layer each student layer learns from.")
    vocab_size: int | None = Field(
        None, gt=0, description="Causal LM: the real vocabulary both logit widths share (the rest is padding); "
        "default: the smaller width when teacher and student vocabularies are padded differently.")
    fused_lm_head: bool = Field(
        False, description="Causal LM: compute the logit loss through both LM heads in chunks of rows "
        "(compress.kernels on CUDA), never building the [tokens x vocab] student logits; needs weights.ce = 0.")


@dataclass
class LossTerms:
    """One batch's objective: `total` (weighted sum, to minimise) and the unweighted `terms` by name (tensors
    still attached to the graph: a caller may weigh them again, reward with them or log them), and both
    models' outputs (`student.logits`, `teacher.logits`...: a caller's own terms need no second forward;
    with `fused_lm_head` there are no logits, only `last_hidden_state`)."""

    total: Tensor
    terms: dict[str, Tensor]
    student: Any = None
    teacher: Any = None

    def floats(self) -> dict[str, float]:
        """The terms as plain numbers, for logs and the trainer's NaN errors."""
        return {k: float(v.detach()) for k, v in self.terms.items()}


def no_attention_dropout(adapter: Any) -> None:
    """Turn off the dropout inside each attention module of a model: HF returns the attention probabilities
    after their dropout, so an attention-map loss on a training-mode student would compare maps with dropped
    (zeroed, rescaled) entries to the teacher's (2.5 nats per row instead of 0.006 on MiniLM)."""
    for layer in adapter.layers:
        for m in layer.attention.module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # HF attention reads its dropout module's p at each forward
        if isinstance(getattr(layer.attention.module, "attention_dropout", None), float):
            layer.attention.module.attention_dropout = 0.0  # LLaMA/Qwen2 keep it as a float


class DistillObjective:
    """Weighted distillation loss terms of `student` against `teacher` (see the module doc).

    Args:
        student, teacher: the models (the teacher frozen, e.g. by `compress.distill.teacher.prepare_teacher`),
            on the device the batches will be on.
        cfg: what to compute (an `ObjectiveConfig`; the distill pass's config is one).
        task: the run's task; causal LMs shift the logits, feature extractors use the embedding term.
        pairs: the layer map (student layer, teacher layer), 1-based, 0 = embeddings; default:
            `cfg.mapping` resolved for both depths.
        student_adapter, teacher_adapter: the models' adapters (default: `compress.models.get_adapter`).
        teacher_cache: read and store the teacher's outputs of the training batches there.
        where: names the config in errors, e.g. "passes: 'distill'".
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cfg: ObjectiveConfig,
        *,
        task: str,
        pairs: list[Pair] | None = None,
        student_adapter: Any = None,
        teacher_adapter: Any = None,
        teacher_cache: TeacherCache | None = None,
        where: str = "distill",
        teacher_id_map: Tensor | None = None,
        sentence: Any = None,
    ):
        from compress.models import get_adapter

        self.student, self.teacher, self.cfg, self.task, self.where = student, teacher, cfg, task, where
        # a vocabulary-trimmed student: its ids -> the teacher's (compress.prune.idmap)
        self.teacher_id_map = teacher_id_map
        self.s_ad = student_adapter or get_adapter(student)
        self.t_ad = teacher_adapter or get_adapter(teacher)
        self.pairs = list(pairs) if pairs is not None else cfg.mapping.resolve(self.s_ad.num_layers,
                                                                               self.t_ad.num_layers)
        w = cfg.weights
        self.feature = task == "feature-extraction"
        ds, dt = self.s_ad.hidden_size, self.t_ad.hidden_size
        device = next(student.parameters()).device
        # created in this order from the torch RNG: the same seed gives the same projections and filters
        self.projections = nn.ModuleDict()
        if w.hidden > 0 or w.attention_output > 0 or (self.feature and sentence is None and w.embedding + w.embedding_mse + w.contrastive > 0):
            last = {self.s_ad.num_layers} if self.feature else set()
            for s in sorted({s for s, _ in self.pairs} | last):
                self.projections[str(s)] = losses.HiddenProjector(ds, dt)
        self.filters = nn.ModuleDict()
        if cfg.hidden_loss == "ted" and w.hidden > 0:
            for s, _ in self.pairs:
                self.filters[str(s)] = losses.TaskAwareFilter(ds, dt)
                self.filters[str(s)].freeze_teacher()
        # a sentence-embedding student (compress.embed.SentenceHeads): its head (pooling, trained projection)
        # is trained with it; the teacher's head is fixed
        self.sentence = sentence
        if sentence is not None:
            self.projections["sentence"] = sentence.student
        self.projections.to(device)
        self.filters.to(device)
        self.taid = losses.TAID() if cfg.logit_loss == "taid" else None
        self.captures = dict(hidden_states=w.hidden > 0 or self.feature, attentions=w.attention > 0,
                             attention_outputs=w.attention_output > 0, qkv=w.relation > 0)
        if w.attention > 0:
            no_attention_dropout(self.s_ad)
        if cfg.student_dropout is False:
            for m in student.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            no_attention_dropout(self.s_ad)
        self.teacher_cache = teacher_cache
        self.fused_steps = 0  # logit losses through the LM heads, and those of them on the fused kernel
        self.fused_kernel_steps = 0
        if cfg.fused_lm_head:
            for ad, who in ((self.s_ad, "student"), (self.t_ad, "teacher")):
                if ad.head is None or not isinstance(getattr(ad.head, "weight", None), torch.Tensor):
                    raise InputError(f"{where}.fused_lm_head: the {who} has no LM head weight to fuse")
                if getattr(ad.head, "bias", None) is not None:
                    raise InputError(f"{where}.fused_lm_head: the {who}'s LM head has a bias; set it false")

    def modules(self) -> dict[str, nn.Module]:
        """The objective's own trained modules (hidden-state projections, TED filters): the trainer's extra
        modules, so that they are optimised, checkpointed and synchronised with the student."""
        return {"projections": self.projections, "filters": self.filters}

    def match_layers(self, batch: dict[str, Tensor]) -> list[Pair]:
        """With `mapping.strategy: dynamic`, choose the layer map from the hidden states of both models on
        `batch` (CoFi: each teacher layer to the closest student layer through the projections); else keep
        the static map. Returns the map in use."""
        if self.cfg.mapping.strategy != "dynamic":
            return self.pairs
        with torch.no_grad(), self.s_ad.capture(detach=True) as sc, self.t_ad.capture(detach=True) as tc:
            self.student(**batch)
            self.teacher(**self._teacher_inputs(batch))
            self.pairs = dynamic_map(sc.hidden_states, tc.hidden_states,
                                     self.projections if len(self.projections) else None,
                                     teacher_layers=self.cfg.mapping.teacher_layers,
                                     attention_mask=batch.get("attention_mask"))
        return self.pairs

    # ------------------------------------------------------------------------------------------ terms

    def __call__(self, batch: dict[str, Tensor], *, layers: Collection[int] | None = None,
                 model: nn.Module | None = None) -> LossTerms:
        """The terms for `batch` (inputs and, for `ce`, labels). `layers`: the student layers whose layer
        losses are on (pairs from the embeddings, layer 0, always are); None: every layer. `model`: the
        student as the trainer hands it (the same module)."""
        cfg, w = self.cfg, self.cfg.weights
        s_out, t_out, sc, tc = self._forward(batch, self.captures, model or self.student)
        mask = batch.get("attention_mask")
        terms: dict[str, Tensor] = {}
        if self.feature:
            terms.update(self._embedding_terms(s_out.last_hidden_state, t_out.last_hidden_state, mask))
        else:
            if w.logit > 0 and cfg.fused_lm_head:
                terms["logit"] = self._fused_logit(s_out.last_hidden_state, t_out.last_hidden_state,
                                                   batch.get("labels"))
            elif w.logit > 0:
                terms["logit"] = self.logit_term(s_out.logits, t_out.logits, batch.get("labels"))
            if w.ce > 0 and getattr(s_out, "loss", None) is not None:
                terms["ce"] = s_out.loss
        live = [(s, t) for s, t in self.pairs if layers is None or s in layers or s == 0]
        if w.hidden > 0 and live:
            if cfg.hidden_loss == "ted":
                hid = [self.filters[str(s)](sc.hidden_states[s], tc.hidden_states[t], mask) for s, t in live]
            else:
                fn = losses.hidden_mse if cfg.hidden_loss == "mse" else losses.hidden_cosine
                hid = [fn(sc.hidden_states[s], tc.hidden_states[t], self.projections[str(s)], attention_mask=mask)
                       for s, t in live]
            terms["hidden"] = sum(hid) / len(hid)
        blocks = [(s, t) for s, t in live if s >= 1 and t >= 1]
        # a layer whose attention was pruned away (compress.prune) has no map and no output to match: left out
        att = [(s, t) for s, t in blocks if sc.attentions[s - 1] is not None and tc.attentions[t - 1] is not None]
        if w.attention > 0 and att:
            terms["attention"] = sum(
                losses.attention_kl(sc.attentions[s - 1], tc.attentions[t - 1], mask) for s, t in att) / len(att)
        out = [(s, t) for s, t in blocks
               if sc.attention_outputs[s - 1] is not None and tc.attention_outputs[t - 1] is not None]
        if w.attention_output > 0 and out:
            terms["attention_output"] = sum(
                losses.attention_output_mse(self.projections[str(s)](sc.attention_outputs[s - 1]),
                                            tc.attention_outputs[t - 1], mask) for s, t in out) / len(out)
        if w.relation > 0:
            heads = cfg.relation_heads or self.s_ad.num_heads
            terms["relation"] = losses.minilm_relation_kl(sc.q[-1], sc.k[-1], sc.v[-1], tc.q[-1], tc.k[-1], tc.v[-1],
                                                          mask, heads)
        total = sum(getattr(w, k) * v for k, v in terms.items())  # terms are named as LossWeights' fields
        if not isinstance(total, torch.Tensor):
            raise InputError(f"{self.where}.weights: every loss weight is 0 for this task; set one above 0")
        return LossTerms(total=total, terms=terms, student=s_out, teacher=t_out)

    def reference_loss(self, batch: dict[str, Tensor]) -> float:
        """The logit loss (feature extraction: the embedding loss) of the student in eval mode on `batch`,
        through the full logits whatever `fused_lm_head` says: a loss that does not depend on which layer
        losses are on (OPTIMA's reward is its relative decrease)."""
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            s_out, t_out, _, _ = self._forward(batch, {}, self.student)
            mask = batch.get("attention_mask")
            if self.feature:
                s_e, t_e = self._embeddings(s_out.last_hidden_state, t_out.last_hidden_state, mask)
                value = losses.embedding_cosine(s_e, t_e)
            else:
                value = self.logit_term(s_out.logits, t_out.logits, batch.get("labels"))
        self.student.train(was_training)
        return float(value)

    def logit_term(self, s_logits: Tensor, t_logits: Tensor, labels: Tensor | None) -> Tensor:
        """The configured logit loss between student and teacher logits (TAID at its current t)."""
        cfg = self.cfg
        per_position = get_task(self.task).labels
        if per_position == "next-token":  # position t predicts token t+1; score the positions with a label
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
            labels = labels[:, 1:] if labels is not None else None
        if per_position in ("next-token", "token-class"):  # one distribution per position, not per example
            # token classification: the positions that carry a label (each word's first sub-token; padding,
            # special tokens and later sub-tokens hold -100)
            s_logits = s_logits.reshape(-1, s_logits.shape[-1])
            t_logits = t_logits.reshape(-1, t_logits.shape[-1])
            labels = labels.reshape(-1) if labels is not None else None
        else:
            labels = None
        kw: dict[str, Any] = {"temperature": cfg.temperature, "labels": labels,
                              "vocab_size": self._shared_vocab(s_logits.shape[-1], t_logits.shape[-1])}
        if self.taid is not None:
            return self.taid(s_logits, t_logits, **kw)
        if cfg.logit_loss == "jsd":
            kw["beta"] = cfg.beta
        elif cfg.logit_loss in ("skew_kl", "skew_reverse_kl"):
            kw["alpha"] = cfg.alpha
        return getattr(losses, cfg.logit_loss)(s_logits, t_logits, **kw)

    # ------------------------------------------------------------------------------------------ internals

    def _shared_vocab(self, vs: int, vt: int) -> int | None:
        if self.cfg.vocab_size is not None:
            return self.cfg.vocab_size
        return min(vs, vt) if vs != vt else None

    def _fused_logit(self, s_h: Tensor, t_h: Tensor, labels: Tensor | None) -> Tensor:
        from compress.kernels import kernel_usable

        cfg = self.cfg
        self.fused_steps += 1
        self.fused_kernel_steps += int(kernel_usable(s_h))
        s_h, t_h = s_h[:, :-1].reshape(-1, s_h.shape[-1]), t_h[:, :-1].reshape(-1, t_h.shape[-1])
        s_w, t_w = self.s_ad.head.weight, self.t_ad.head.weight
        kw: dict[str, Any] = {"temperature": cfg.temperature, "beta": cfg.beta, "alpha": cfg.alpha,
                              "labels": labels[:, 1:].reshape(-1) if labels is not None else None,
                              "vocab_size": self._shared_vocab(s_w.shape[0], t_w.shape[0])}
        if self.taid is not None:
            kw["taid_t"] = float(self.taid.t)
        return losses.fused_linear_kd(s_h, s_w, (t_h, t_w), kind=cfg.logit_loss, **kw)

    def _embeddings(self, s_h: Tensor, t_h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Student and teacher sentence embeddings (the sentence heads, else mean pooling + projection)."""
        if self.sentence is not None:
            with torch.no_grad():
                t_e = self.sentence.teacher(t_h, mask)
            return self.sentence.student(s_h, mask), t_e
        return self.projections[str(self.s_ad.num_layers)](mean_pool(s_h, mask)), mean_pool(t_h, mask)

    def _embedding_terms(self, s_h: Tensor, t_h: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        w = self.cfg.weights
        if not (w.embedding > 0 or w.embedding_mse > 0 or w.contrastive > 0):
            return {}
        s_e, t_e = self._embeddings(s_h, t_h, mask)
        terms: dict[str, Tensor] = {}
        if w.embedding > 0:
            terms["embedding"] = losses.embedding_cosine(s_e, t_e)
        if w.embedding_mse > 0:
            terms["embedding_mse"] = losses.embedding_mse(s_e, t_e)
        if w.contrastive > 0 and len(s_e) > 1:
            terms["contrastive"] = losses.in_batch_contrastive(s_e, t_e, self.cfg.contrastive_temperature)
        return terms

    def _teacher_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.teacher_id_map is None or "input_ids" not in inputs:
            return inputs
        from compress.prune.idmap import teacher_ids

        return {**inputs, "input_ids": teacher_ids(inputs["input_ids"], self.teacher_id_map)}

    def _run_teacher(self, inputs: dict[str, Tensor], capture: dict[str, bool]) -> tuple[Any, Any]:
        inputs = self._teacher_inputs(inputs)
        with torch.no_grad(), self.t_ad.capture(detach=True, **capture) as tc:
            fused = self.cfg.fused_lm_head and capture is self.captures
            t_out = self.t_ad.base_model(**inputs) if fused else self.teacher(**inputs)
        return t_out, tc

    def _cached_teacher(self, inputs: dict[str, Tensor], capture: dict[str, bool]) -> tuple[Any, Any]:
        def compute(b: Any) -> dict[str, Any]:
            t_out, tc = self._run_teacher(dict(b), capture)
            return {"out": {k: v for k, v in t_out.items() if k in ("logits", "last_hidden_state")},
                    "hidden_states": list(tc.hidden_states), "attentions": list(tc.attentions),
                    "attention_outputs": list(tc.attention_outputs), "q": list(tc.q), "k": list(tc.k),
                    "v": list(tc.v)}

        assert self.teacher_cache is not None
        salt = json.dumps([self.captures, self.cfg.fused_lm_head], sort_keys=True)
        got = self.teacher_cache.cached(compute, inputs, salt=salt)
        return SimpleNamespace(**got["out"]), SimpleNamespace(**{k: v for k, v in got.items() if k != "out"})

    def _forward(self, batch: dict[str, Tensor], capture: dict[str, bool], model: nn.Module
                 ) -> tuple[Any, Any, Any, Any]:
        """Teacher (no_grad; cached for the training captures) and student forward passes with captures."""
        inputs = model_inputs(batch)
        train_captures = capture is self.captures
        if self.teacher_cache is not None and train_captures:
            t_out, tc = self._cached_teacher(inputs, capture)
        else:
            t_out, tc = self._run_teacher(inputs, capture)
        with self.s_ad.capture(**capture) as sc:
            if self.cfg.fused_lm_head and train_captures:  # the logit loss goes through the heads (_fused_logit)
                s_out = self.s_ad.base_model(**inputs)
            else:
                with_labels = self.cfg.weights.ce > 0 and "labels" in batch and not self.feature
                s_out = model(**(batch if with_labels else inputs))
        return s_out, t_out, sc, tc
