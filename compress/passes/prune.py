"""prune: structured pruning to a parameter, fraction or latency target, physically (a smaller model that
reloads), one-shot by importance or with learned hard-concrete masks.

- `method: magnitude | taylor | activation`: score heads, FFN neurons and hidden channels once (whole layers by
  block importance on calibration batches) (compress.prune.importance) and keep the best share that meets the target (bisection over the keep ratio).
- `method: learned` (CoFi / DPHuBERT): hard-concrete gates over the granularities, trained jointly with
  distillation from the teacher (DistillObjective, dynamic layer map by default) and the Lagrangian
  sparsity constraint, the target ramping up from 0, with the shared trainer (compress.prune.masks); then the
  deterministic gates are fitted to the budget, folded into the weights and materialised.
- `vocab` among the granularities trims the vocabulary to the tokens of data.train (plus the special tokens and
  `keep_tokens`) and rewrites the tokenizer (compress.prune.vocab; WordPiece encoders).
- The target: `params` (a count), `fraction` (of the input model's parameters) or `latency_ms` (ORT p50 on the
  run's `target`, of the dynamic-int8 or fp32 ONNX export): the keep ratio of an importance plan is found by
  bisection over measured latencies (for `learned`, that plan's parameter count becomes the masks' target).

The result is saved with `shrink` (compress.prune.shrink): a plain transformers folder when the layers are
uniform, else a compress-registered pruned type. Recovery: put `{type: distill}` after it."""
from __future__ import annotations

import json
import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.artifact import Artifact
from compress.contracts import Kind
from compress.distill.mapping import MappingConfig
from compress.distill.objective import ObjectiveConfig
from compress.distill.teacher import TeacherConfig
from compress.errors import InputError
from compress.passes.base import Pass, PassContext
from compress.passes.common import first_split, model_inputs, task_batches, train_seed
from compress.registry import register
from compress.train.trainer import TrainConfig

log = logging.getLogger(__name__)

PLAN_FILE = "keep_plan.json"  # in the pass's cache entry, next to model/
Granularity = Literal["heads", "ffn", "layers", "hidden", "vocab"]
# learned gates each granularity trains (compress.prune.masks.GRANULARITIES)
GATES = {"heads": ("heads", "attention"), "ffn": ("ffn", "ffn_layer"), "layers": ("attention", "ffn_layer"),
         "hidden": ("hidden",)}


class PruneTarget(BaseModel):
    """How small: exactly one of params, fraction, latency_ms."""

    model_config = ConfigDict(extra="forbid")
    params: int | None = Field(None, gt=0, description="Parameters the pruned model may have at most.")
    fraction: float | None = Field(None, gt=0, description="Share of the input model's parameters kept, below 1 "
                                   "(sparsity = 1 - fraction).")
    latency_ms: float | None = Field(None, gt=0, description="ORT p50 latency on the run's `target` the pruned "
                                     "model's ONNX export may have at most (see latency_precision).")

    @model_validator(mode="after")
    def _one(self) -> PruneTarget:
        given = [k for k in ("params", "fraction", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of params, fraction, latency_ms (got {', '.join(given) or 'none'})")
        if self.fraction is not None and self.fraction >= 1:
            raise ValueError(f"fraction {self.fraction} keeps everything (sparsity {1 - self.fraction:.3g}); use a "
                             "share below 1, e.g. 0.5")
        return self


class VocabTrim(BaseModel):
    """How vocabulary trimming (granularity `vocab`) chooses and spells tokens (compress.prune.vocab)."""

    model_config = ConfigDict(extra="forbid")
    fallback: Literal["unk", "split"] = Field(
        "unk", description="What a dropped token becomes. unk: one extra row, a copy of [UNK]'s, that every dropped "
        "token shares (text splits exactly as before). split: no extra row; the tokenizer keeps only the kept tokens "
        "(and the single-character pieces of the texts' characters), so a word with a dropped piece splits into kept "
        "pieces (docs/pruning.md; better held-out quality at the same size on tweets, docs/embeddings.md).")
    max_tokens: int | None = Field(None, gt=0, description="Keep at most this many of the texts' tokens, the most "
                                   "frequent first (a size budget; the special tokens, keep_tokens and split's "
                                   "character pieces come on top). Unset: every token the texts use.")
    texts: int | None = Field(None, gt=0, description="Collect tokens from this many texts of data.train's source "
                              "and fraction, its `limit` lifted (more text than training reads, e.g. the whole "
                              "split). Unset: data.train as configured.")


class PruneConfig(ObjectiveConfig, TeacherConfig, TrainConfig):
    """What to prune, how and to which target; for `learned`, the trainer's settings (steps, lr of the student
    weights...) and the distillation objective's (losses, weights, layer map) plus the mask options."""

    method: Literal["magnitude", "taylor", "activation", "learned"] = Field(
        "taylor", description="magnitude / taylor (gradient x weight) / activation (Minitron): one-shot importance; "
        "learned: hard-concrete masks trained with distillation and the Lagrangian constraint (CoFi).")
    granularities: list[Granularity] = Field(
        default_factory=lambda: ["heads", "ffn"], min_length=1,
        description="What may be removed: attention heads (GQA: whole kv groups), FFN neurons, whole layers "
        "(one-shot: by block importance on calibration data; learned: layer gates), hidden channels, vocabulary (trimmed to the tokens of data.train).")
    target: PruneTarget = Field(description="How small the pruned model must be: params, fraction or latency_ms.")
    scope: Literal["global", "layer"] = Field("global", description="Importance methods: rank units across layers "
                                              "(global) or keep the same share in every layer (layer).")
    round_to: int | None = Field(None, gt=0, description="Round kept FFN widths and hidden size to a multiple of "
                                 "this (8, 16, 64: efficient int8 kernels).")
    calibration_examples: int = Field(128, gt=0, description="Examples of data.calibration (else data.train) "
                                      "for taylor / activation scores.")
    keep_tokens: list[str] = Field(default_factory=list, description="Vocabulary trimming: tokens kept besides "
                                   "those of data.train and the special tokens.")
    vocab: VocabTrim = Field(default_factory=VocabTrim, description="Vocabulary trimming: the fallback for dropped "
                             "tokens, a token budget and the texts tokens are collected from.")
    latency_precision: Literal["int8", "fp32"] = Field(
        "int8", description="Latency target: measure the dynamic-int8 (as ptq ships it) or the fp32 ONNX export.")
    latency_steps: int = Field(7, gt=0, description="Latency target: bisection steps over the keep ratio.")
    # learned masks
    mask_lr: float = Field(0.1, gt=0, description="learned: lr of the gates' log_alpha (constant, no clipping).")
    lambda_lr: float = Field(1.0, gt=0, description="learned: lr of the Lagrange multipliers (gradient ascent).")
    target_ramp: float = Field(0.3, ge=0, le=1, description="learned: share of the steps over which the target "
                               "sparsity ramps linearly from 0.")
    init_keep: float = Field(0.99, gt=0, lt=1, description="learned: P(gate > 0) at the start.")
    remap_every: int = Field(10, gt=0, description="learned with mapping dynamic: steps between layer re-matches.")
    mapping: MappingConfig = Field(default_factory=lambda: MappingConfig(strategy="dynamic"),
                                   description="Which teacher layer each student layer learns from (learned; "
                                   "default dynamic, CoFi).")
    max_length: int | None = Field(None, gt=0, description="Max tokens per example (default: model.max_length).")


@register
class Prune(Pass):
    """Structured pruning (heads, FFN, layers, hidden, vocabulary) to a params / fraction / latency target."""

    type = "prune"
    Config = PruneConfig
    # 2: vocabulary trimming in the same shrink as the rest (a second shrink misread a pruned BERT's head size)
    # 3: writes its KeepPlan to keep_plan.json in the cache entry (benchmarks/pipeline.py row 4); 4: `vocab` options
    version = "4"
    uses_data = ("train", "calibration")
    consumes = (Kind.TORCH_STUDENT,)
    refuses = (Kind.ONNX,)  # pruning changes the model: export after it
    produces = (Kind.TORCH_STUDENT,)

    def reads_from_run(self, run: Any) -> Any:
        """With vocab.texts, the texts beyond data.train's limit enter the cache key (their fingerprint)."""
        cfg: PruneConfig = self.config  # type: ignore[assignment]
        if "vocab" not in cfg.granularities or cfg.vocab.texts is None or run.data.train is None:
            return None
        return {"vocab_texts": _vocab_records(run, cfg.vocab.texts).fingerprint}

    @property
    def uses_target(self) -> bool:  # a latency target depends on where it is measured
        return self.config.target.latency_ms is not None  # type: ignore[attr-defined]

    def validate(self, run: Any) -> str | None:
        from compress.tasks import get_task

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        task = get_task(run.model.task)
        grans = set(cfg.granularities)
        if cfg.method != "learned" and "layers" in grans and run.data.calibration is None and run.data.train is None:
            return "granularities: 'layers' scores layers on data.calibration (or data.train); add one"
        if grans == {"vocab"} and cfg.method == "learned":
            return "granularities: learned masks need heads, ffn, layers or hidden besides vocab"
        if "vocab" in grans and (task.modality != "text" or task.labels == "next-token"):
            return (f"granularities: vocab trimming is for text encoders; task '{run.model.task}' has no "
                    "vocabulary to trim (remove 'vocab')")
        if "vocab" in cfg.model_fields_set and "vocab" not in grans:
            return "vocab: these options are for vocabulary trimming; add 'vocab' to granularities or remove them"
        if "vocab" in grans and run.data.train is None:
            return "granularities: vocab trimming keeps the tokens of data.train; add data.train"
        if cfg.method == "learned":
            if run.data.train is None:
                return "method learned trains on data.train; add it"
            if run.model.task == "feature-extraction" and cfg.weights.ce > 0:
                return "weights.ce: feature-extraction data has no labels to train on; set it to 0"
        if cfg.method in ("taylor", "activation") and run.data.calibration is None and run.data.train is None:
            return f"method {cfg.method} scores units on data.calibration (or data.train); add one"
        return None

    # ------------------------------------------------------------------------------------------------ run

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.prune.importance import count_params  # with a plan: what shrink would leave
        from compress.prune.importance import plan_for_target
        from compress.prune.plan import KeepPlan
        from compress.models import get_adapter
        from compress.prune.shrink import layer_sizes, shrink

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        seed = train_seed(cfg, ctx)
        torch.manual_seed(seed)
        model = ctx.load_student(artifact).eval()
        pre = ctx.load_preprocessor(artifact)
        before = count_params(model)
        layers_before = layer_sizes(model)
        grans = list(dict.fromkeys(cfg.granularities))
        structural = [g for g in grans if g != "vocab"]
        self._check_family(model, structural, ctx)

        kept_vocab, new_pre = None, pre
        if "vocab" in grans:
            from compress.prune.vocab import dropped_token_rows, kept_token_ids, trim_tokenizer

            v = cfg.vocab
            texts = (ctx.data.records("train") if v.texts is None else _vocab_records(ctx.run, v.texts)).texts
            if not texts:
                raise InputError(f"passes: '{ctx.label}'.granularities: vocab trimming needs texts in data.train")
            kept_vocab = kept_token_ids(pre, texts, cfg.keep_tokens, max_tokens=v.max_tokens,
                                        char_pieces=v.fallback == "split")
            new_pre = trim_tokenizer(pre, kept_vocab, v.fallback)
            ctx.metrics.update(vocab_kept=len(kept_vocab), vocab_fallback=v.fallback, vocab_texts=len(texts))
            extra_row = dropped_token_rows(v.fallback)  # the shared row of dropped tokens (fallback unk)
        else:
            extra_row = 0

        scores = None
        target_params: int | None = None
        plan: KeepPlan | None = None
        if cfg.target.params is not None:
            target_params = cfg.target.params
        elif cfg.target.fraction is not None:
            target_params = int(cfg.target.fraction * before)
        if cfg.method != "learned" or cfg.target.latency_ms is not None:
            scores = self._scores(model, pre, "magnitude" if cfg.method == "learned" else cfg.method, ctx,
                                  layers=cfg.method != "learned" and "layers" in structural)
        # one-shot methods drop whole layers by block importance; learned masks learn them (their latency plan
        # keeps every layer)
        importance_grans = [g for g in structural if g != "layers" or cfg.method != "learned"]
        if cfg.target.latency_ms is not None:
            plan = self._plan_for_latency(model, scores, importance_grans, kept_vocab, ctx)
            target_params = count_params(model, plan) if plan is not None else before
            if plan is not None and extra_row:  # and the extra row trimming adds
                target_params += len(plan.hidden) if plan.hidden is not None else get_adapter(model).hidden_size
            ctx.metrics["latency_plan_params"] = target_params
        assert target_params is not None
        ctx.metrics["target_params"] = target_params
        if target_params >= before and kept_vocab is None:
            log.info("%s: the model (%d params) already meets the target (%d)", ctx.label, before, target_params)

        if cfg.method == "learned":
            pruned, plan = self._learn(artifact, model, pre, structural, kept_vocab, extra_row, target_params, seed,
                                       ctx)
        else:
            if plan is None:
                if importance_grans:  # trimming adds one row (id K, where dropped tokens go): leave room for it
                    room = get_adapter(model).hidden_size * extra_row
                    plan = plan_for_target(model, scores, params=min(target_params, before) - room,
                                           granularities=importance_grans, scope=cfg.scope, round_to=cfg.round_to,
                                           keep_vocab=kept_vocab)
                else:
                    plan = KeepPlan(vocab=kept_vocab)
            plan.vocab = kept_vocab
            pruned = shrink(model, plan)
        if extra_row:  # the kept rows and one more, id K, a copy of [UNK]'s (compress.prune.vocab)
            from compress.prune.vocab import add_dropped_token_row

            add_dropped_token_row(pruned, kept_vocab, pre.unk_token_id)
        after = count_params(pruned)
        if after > target_params:
            raise InputError(f"passes: '{ctx.label}'.target: {target_params} parameters cannot be reached with "
                             f"granularities {grans} (the pruned model has {after}); add granularities or raise it")
        self._metrics(ctx, model, pruned, plan, before, after, layers_before)
        folder = ctx.save_student(pruned.cpu(), new_pre)
        # which units of the input model were kept (indices of that model): benchmarks/pipeline.py shrinks a plain
        # student of the same shape with it
        (ctx.out_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
        from compress.embed.hooks import carry_st_files

        carry_st_files(artifact.model_dir, folder, pruned, where=f"passes: '{ctx.label}'")  # a sentence student stays one
        if kept_vocab is not None:  # the teacher keeps the original ids: distill maps them (compress.prune.idmap)
            from compress.prune.idmap import load_id_map, save_id_map

            previous = load_id_map(artifact.model_dir)  # trimmed twice: compose with the earlier map
            ids = [*kept_vocab, *[int(pre.unk_token_id)] * extra_row]  # id K (dropped tokens) -> the teacher's [UNK]
            save_id_map(folder, ids if previous is None else previous[torch.tensor(ids)].tolist())
        return artifact.replace(model_dir=folder)

    # ------------------------------------------------------------------------------------------------ parts

    def _check_family(self, model: torch.nn.Module, structural: list[str], ctx: PassContext) -> None:
        from compress.models import get_adapter

        ad = get_adapter(model)  # InputError for a family the adapters do not cover
        where = f"passes: '{ctx.label}'.granularities"
        if "heads" in structural and ad.num_heads < 2 and ad.num_kv_heads < 2:
            raise InputError(f"{where}: the model has a single attention head per layer; remove 'heads'")
        if "vocab" in (self.config.granularities) and (ad.modality != "text" or ad.causal):  # type: ignore[attr-defined]
            raise InputError(f"{where}: vocab trimming is for text encoders; a {ad.family} model has no vocabulary "
                             "to trim (remove 'vocab')")
        if "layers" in structural and ad.num_layers < 2:
            raise InputError(f"{where}: the model has one layer; remove 'layers'")

    def _scores(self, model: torch.nn.Module, pre: Any, method: str, ctx: PassContext, *, layers: bool = False) -> Any:
        from compress.prune.importance import score_units

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        batches = None
        if method != "magnitude" or layers:
            split = first_split(ctx, "calibration", "train")
            batches = list(task_batches(ctx, split, pre, batch_size=16, limit=cfg.calibration_examples,
                                        max_length=cfg.max_length, model=model))
            if method != "taylor":  # taylor's loss needs the labels
                batches = [model_inputs(b) for b in batches]
        return score_units(model, method, batches, layers=layers)

    def _latency(self, model: torch.nn.Module, ctx: PassContext, name: str) -> float:
        """p50 (ms) of `model`'s ONNX export on the run's target, at `latency_precision` (compress.search.latency)."""
        from compress.search.latency import measure

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        return float(measure(model, ctx.run.model.task, ctx.run.target, ctx.work_dir / "latency" / name,
                             precision=cfg.latency_precision)["p50_ms"])

    def _plan_for_latency(self, model: torch.nn.Module, scores: Any, grans: list[str], kept_vocab: list[int] | None,
                          ctx: PassContext) -> Any:
        """The importance plan with the largest keep ratio whose export meets target.latency_ms (None: the
        unpruned model already does). InputError below the floor: a 1-layer model with one head, the fewest
        neurons (and hidden channels) the granularities allow."""
        from compress.prune.importance import plan_at_ratio
        from compress.prune.plan import KeepPlan
        from compress.prune.shrink import shrink

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        goal = float(cfg.target.latency_ms)  # type: ignore[arg-type]

        def build(ratio: float) -> KeepPlan:
            plan = plan_at_ratio(model, scores, ratio, granularities=grans, scope=cfg.scope, round_to=cfg.round_to) \
                if grans else KeepPlan()
            plan.vocab = kept_vocab
            return plan

        floor_plan = build(0.0)
        floor_plan.layers = [0]
        floor = self._latency(shrink(model, floor_plan), ctx, "floor")
        ctx.metrics["latency_floor_ms"] = floor
        if goal < floor:
            raise InputError(f"passes: '{ctx.label}'.target.latency_ms: {goal:g} ms is below the floor of "
                             f"{floor:.3g} ms measured for a 1-layer minimal model on this target; raise it")
        full = build(1.0)
        full_ms = self._latency(shrink(model, full), ctx, "full")
        history = [{"ratio": 1.0, "p50_ms": full_ms}]
        if full_ms <= goal:
            ctx.metrics["latency_search"] = history
            return full
        lo, hi = 0.0, 1.0
        best = None
        for step in range(cfg.latency_steps):
            mid = (lo + hi) / 2
            ms = self._latency(shrink(model, build(mid)), ctx, f"search-{step}")
            history.append({"ratio": mid, "p50_ms": ms})
            if ms <= goal:
                lo, best = mid, mid
            else:
                hi = mid
        ctx.metrics["latency_search"] = history
        if best is None:
            raise InputError(f"passes: '{ctx.label}'.target.latency_ms: {goal:g} ms was not met by pruning "
                             f"{', '.join(grans) or 'nothing'} (the floor is {floor:.3g} ms with one layer); "
                             "add granularities (layers, hidden) or raise it")
        return build(best)

    def _learn(self, artifact: Artifact, model: torch.nn.Module, pre: Any, structural: list[str],
               kept_vocab: list[int] | None, extra_row: int, target_params: int, seed: int,
               ctx: PassContext) -> tuple[Any, Any]:
        from compress.distill.teacher import prepare_teacher
        from compress.prune import masks as hc
        from compress.prune.shrink import shrink

        cfg: PruneConfig = self.config  # type: ignore[assignment]
        gates = sorted({g for s in structural for g in GATES[s]}, key=hc.GRANULARITIES.index)
        teacher = prepare_teacher(ctx.load_teacher(artifact), cfg).to(ctx.device)
        student = model.to(ctx.device).train()
        vocab_removed = 0 if kept_vocab is None else int(student.config.vocab_size) - len(kept_vocab) - extra_row
        p0 = sum(p.numel() for p in student.parameters())
        sparsity = max(0.0, 1.0 - target_params / p0)

        def batches(epoch: int) -> Any:
            return task_batches(ctx, "train", pre, batch_size=cfg.batch_size, shuffle=True, seed=seed + epoch,
                                max_length=cfg.max_length, model=teacher)

        masks, result = hc.learn_masks(
            student, teacher, objective_cfg=ObjectiveConfig(**{k: getattr(cfg, k) for k in ObjectiveConfig.model_fields}),
            task=ctx.run.model.task, train_cfg=TrainConfig.subset(cfg, seed=seed), train_batches=batches,
            target_sparsity=sparsity, granularities=gates, mask_lr=cfg.mask_lr, lambda_lr=cfg.lambda_lr,
            ramp=cfg.target_ramp, init_keep=cfg.init_keep, multiple=cfg.round_to or 1, remap_every=cfg.remap_every,
            vocab_removed=vocab_removed, checkpoint_dir=ctx.work_dir / "ckpt", progress=ctx.progress,
            label=ctx.label, where=f"passes: '{ctx.label}'")
        student = student.cpu().eval()
        masks = masks.cpu()
        lagrangian_sparsity = float(masks.expected_sparsity(student).detach())
        shift = hc.fit_budget(student, masks, target_params)
        folded, plan, z = hc.materialise(student, masks)
        plan.vocab = kept_vocab  # one shrink for everything (the extra row for dropped tokens follows in run())
        ctx.metrics.update(
            steps=result["steps"], final_loss=result["final_loss"], loss_curve=result["loss_curve"],
            term_curves=result["term_curves"], sparsity_curve=result["sparsity_curve"], lambdas=result["lambdas"],
            layer_map=result["layer_map"], target_sparsity=sparsity, lagrangian_sparsity=lagrangian_sparsity,
            budget_shift=shift, gates=list(gates), train_device=result["device"],
        )
        return shrink(folded, plan), plan

    def _metrics(self, ctx: PassContext, model: torch.nn.Module, pruned: torch.nn.Module, plan: Any, before: int,
                 after: int, layers_before: list[dict[str, int]]) -> None:
        from compress.models import get_adapter
        from compress.prune import reload
        from compress.prune.shrink import layer_sizes

        ad_in, ad_out = get_adapter(model), get_adapter(pruned)
        kept = [None if plan.layers is None else list(plan.layers)]
        ctx.metrics.update(
            params_before=before, params_after=after, params_ratio=after / before,
            layers_before=layers_before, kept_per_layer=layer_sizes(pruned),
            kept_layers=kept[0] if kept[0] is not None else list(range(len(layers_before))),
            hidden_before=ad_in.hidden_size, hidden_after=ad_out.hidden_size,
            vocab_before=ad_in.vocab_size, vocab_after=ad_out.vocab_size,
            reload="compress" if reload.is_pruned_type(pruned.config) else "transformers",
        )


def _vocab_records(run: Any, texts: int) -> Any:
    """`texts` records of data.train's source and fraction (its limit replaced): what vocab.texts collects from."""
    from compress.data.sources import load_records

    spec = run.data.train.model_copy(update={"limit": texts})
    return load_records(spec, base_dir=run.base_dir, name="data.train")
