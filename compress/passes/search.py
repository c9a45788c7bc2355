"""search: the best student shape under measured budgets, initialised from the teacher (docs/search.md).

Each proposed shape (`compress.search.space`) is checked against the constraints before it is scored: its
parameter count (from the slicing plan, on a meta copy), then, unless the fitted latency model already predicts
it far over the budget, its int8 file size and p50 latency measured in ONNX Runtime on the run's `target`
(exported at init, dynamic int8 as the ptq pass makes it; each shape timed once per target and toolchain, kept in
the run's cache folder across runs). A feasible shape is scored at init (DisWOT, or the baselines: params, KD loss
after a few steps); aging evolution (or random search) proposes the next. The best-scoring feasible shape is
built from the teacher's weights (`compress.search.student`: kept layers, most important heads / neurons /
hidden channels, sliced with `compress.prune.shrink`) and handed on as the artifact's student, so a `distill`
pass after it (without `student_layers`) trains it."""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field

from compress.artifact import Artifact
from compress.contracts import Kind
from compress.errors import InputError
from compress.passes.base import Pass, PassConfig, PassContext
from compress.registry import register
from compress.search.space import SpaceConfig

log = logging.getLogger(__name__)


class SearchConfig(PassConfig):
    """The space, the budgets, the score and the search strategy."""

    space: SpaceConfig = Field(default_factory=SpaceConfig, description="Values of each dimension to try.")
    max_latency_ms: float | None = Field(None, gt=0, description="Budget: p50 latency of the int8 student on `target` (ms).")
    min_speedup: float | None = Field(None, gt=1, description="Budget relative to the teacher, portable across "
                                      "machines: the int8 student's p50 must be at least this many times lower than "
                                      "the teacher's on `target` (timed in the same run, cached like a shape). With "
                                      "max_latency_ms too, the tighter of the two holds.")
    speedup_over: Literal["fp32", "int8"] = Field("fp32", description="min_speedup's reference: the teacher's fp32 ONNX "
                                                  "export, or its dynamic-int8 one (what users ship today).")
    max_params: int | None = Field(None, gt=0, description="Budget: parameters of the student.")
    max_size_mb: float | None = Field(None, gt=0, description="Budget: size of the student's dynamic-int8 ONNX file (MB).")
    score: Literal["diswot", "params", "kd"] = Field("diswot", description="How candidates are ranked at init: DisWOT, "
                                                     "parameter count, or the KD loss after `kd_steps` steps.")
    algorithm: Literal["evolution", "random"] = Field("evolution", description="Aging evolution or random search.")
    population: int = Field(12, gt=0, description="Aging evolution: population size.")
    sample: int = Field(4, gt=0, description="Aging evolution: members drawn to pick each parent.")
    iterations: int = Field(24, gt=0, description="Proposals (a repeated shape counts, and is not measured again).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop proposing after this many seconds.")
    seed: int | None = Field(None, description="Seed of the search (default: the pass's seed).")
    batch_size: int = Field(16, gt=1, description="Examples of the scoring batch (data.train; B of DisWOT's B x B Gram).")
    max_length: int | None = Field(None, gt=0, description="Max tokens per scoring example (default: model.max_length).")
    kd_steps: int = Field(5, ge=0, description="score kd: optimizer steps before the KD loss is read.")
    kd_lr: float = Field(1e-4, gt=0, description="score kd: learning rate of those steps.")
    importance: Literal["magnitude", "taylor", "activation"] = Field(
        "magnitude", description="How heads, neurons and hidden channels are ranked for inheritance (compress.prune).")
    inherit_layers: Literal["uniform", "importance"] = Field(
        "uniform", description="Which teacher layers a shallower student keeps: every k-th (and the last), or the most important.")
    init: Literal["inherit", "random"] = Field("inherit", description="Student weights: sliced from the teacher, or random (for comparison).")
    latency_model: bool = Field(True, description="Fit a latency model on the measurements and skip measuring shapes it "
                                "predicts over max_latency_ms by more than latency_margin.")
    latency_margin: float = Field(0.5, ge=0, description="Relative margin over the budget before a prediction alone rejects.")
    latency_model_min_points: int = Field(6, ge=3, description="Measurements before the latency model predicts.")
    measure_runs: int | None = Field(None, gt=0, description="Timed runs per candidate (default: target.runs).")
    latency_guard: bool = Field(True, description="Time a reference graph before and after each measurement; a "
                                "measurement taken under load (a probe slower than the fastest seen by more than "
                                "latency_tolerance) is measured again, and if still noisy its fastest run stands in "
                                "for the p50 in this run and it is never cached (docs/search.md).")
    latency_tolerance: float = Field(0.5, gt=0, description="Load guard: how much slower than its baseline (the "
                                     "fastest probe run seen) a probe's p50 may be before the measurement is noisy.")
    latency_retries: int = Field(2, ge=0, description="Load guard: extra attempts at a noisy measurement.")
    quantize_embeddings: bool | None = Field(None, description="Quantize embedding tables (Gather) too when measuring "
                                             "size and latency (default: as the run's ptq pass does).")


@register
class Search(Pass):
    """Search the student's shape under params / int8 size / ORT latency budgets (DisWOT), inherit the teacher's weights."""

    type = "search"
    Config = SearchConfig
    # 2: the load guard (noisy latencies are measured again, never cached); a trimmed student carries vocab_kept.json
    # 3: min_speedup (a latency budget relative to the teacher timed in the same run)
    version = "3"
    uses_data = ("train",)
    uses_target = True
    consumes = (Kind.TEACHER,)
    produces = (Kind.TORCH_STUDENT,)

    def validate(self, run: Any) -> str | None:
        cfg: SearchConfig = self.config  # type: ignore[assignment]
        if run.data.train is None:
            return "search needs data.train (the scoring batch)"
        return None

    def reads_from_run(self, run: Any) -> Any:
        """Unset quantize_embeddings follows the run's ptq passes (compress.embed.hooks.ptq_quantizes_embeddings):
        their settings are then part of this pass's key, so changing them measures the candidates again."""
        if self.config.quantize_embeddings is not None:  # type: ignore[attr-defined]
            return None
        return {"ptq_quantize_embeddings": [p.options().get("quantize_embeddings", "auto") for p in run.passes
                                            if p.type == "ptq"]}

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.models import get_adapter
        from compress.passes.common import model_inputs, task_batches
        from compress.prune import count_params, score_units
        from compress.search import evolve
        from compress.search.student import build_student, plan_for
        from compress.search.latency import (LatencyCache, LatencyModel, cache_key, export_for_timing, guarded_measure,
                                             probe, probe_key, time_graph, toolchain_versions)
        from compress.search.score import DisWOT, kd_score, params_score, remap_ids
        from compress.search.space import Space, TeacherShape

        cfg: SearchConfig = self.config  # type: ignore[assignment]
        seed = cfg.seed if cfg.seed is not None else ctx.seed
        torch.manual_seed(seed)
        task = ctx.run.model.task
        where = f"passes: '{ctx.label}'"
        teacher = ctx.load_teacher(artifact).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        pre = ctx.load_preprocessor(artifact)
        shape = TeacherShape.of(teacher)
        space = Space.from_config(cfg.space, shape, where=f"{where}: space")
        target = ctx.run.target
        if cfg.measure_runs is not None:
            target = target.model_copy(update={"runs": cfg.measure_runs})

        batches = list(task_batches(ctx, "train", pre, batch_size=cfg.batch_size, limit=cfg.batch_size * (1 + cfg.kd_steps),
                                    max_length=cfg.max_length, model=teacher))
        score_batch = model_inputs(batches[0])
        if score_batch.get("input_ids") is not None and score_batch["input_ids"].shape[0] < 2:
            raise InputError(f"{where}: data.train has fewer than 2 examples; DisWOT's relation needs a batch of >= 2")
        imp_batches = None if cfg.importance == "magnitude" else [{k: v for k, v in b.items()} for b in batches[:4]]
        scores = score_units(teacher, cfg.importance, imp_batches)
        kept_vocab = None
        if True in space.values["trim_vocab"]:
            from compress.prune import kept_token_ids

            texts = ctx.data.records("train").texts
            if texts is None or pre is None or not hasattr(pre, "get_vocab"):
                raise InputError(f"{where}: space.trim_vocab needs text training data and a tokenizer")
            kept_vocab = kept_token_ids(pre, texts)
        unk = getattr(pre, "unk_token_id", None)
        diswot = DisWOT(teacher, score_batch, task) if cfg.score == "diswot" else None

        cache = LatencyCache(ctx.run.cache_path, tolerance=cfg.latency_tolerance,
                             probe_key=probe_key(target) if cfg.latency_guard else None)
        probe_dir = ctx.run.cache_path if ctx.run.cache_path is not None else ctx.work_dir
        noisy: list[str] = []
        versions = toolchain_versions()
        q_emb = cfg.quantize_embeddings
        if q_emb is None:
            from compress.embed.hooks import ptq_quantizes_embeddings  # ptq's `auto` default included

            q_emb = ptq_quantizes_embeddings(ctx.run, artifact.teacher_dir or artifact.model_dir)
        op_types = ("MatMul", "Gemm", "Gather") if q_emb else ("MatMul", "Gemm")
        tdict = {**target.model_dump(mode="json"), "op_types": list(op_types)}
        lat_model = LatencyModel(head_dim=shape.head_dim, seq_len=target.seq_len, batch=target.batch_size,
                                 min_points=cfg.latency_model_min_points) if cfg.latency_model else None
        seen_min: dict[str, float] = {}
        teacher_cfg = teacher.config.to_dict()
        family_key = {k: teacher_cfg.get(k) for k in ("model_type", "vocab_size", "max_position_embeddings", "num_labels")}
        family_key["id2label"] = len(teacher_cfg.get("id2label") or {})

        def note(name: str, value: float) -> None:
            seen_min[name] = min(seen_min.get(name, math.inf), value)

        def timed(model: Any, folder: Any, precision: str = "int8") -> dict[str, Any]:
            """Export `model` once and time it (between load-guard probes); clean timings are the caller's to cache."""
            exported = export_for_timing(model, task, target, folder, op_types=op_types, precision=precision)
            if cfg.latency_guard:  # a noisy measurement is timed again, not exported again
                return guarded_measure(lambda: time_graph(exported, target), lambda: probe(target, probe_dir),
                                       cache, retries=cfg.latency_retries)
            return time_graph(exported, target)

        def keep(key: str, name: str, measured: dict[str, Any]) -> None:
            if measured.get("noisy"):  # measured under load: used in this run, never persisted
                noisy.append(name)
            else:
                cache.put(key, measured)

        budget_ms, budget_from = cfg.max_latency_ms, "max_latency_ms"
        teacher_ms = None
        if cfg.min_speedup is not None:
            key = cache_key({"teacher": shape.candidate().to_dict(), **family_key, "task": task,
                             "precision": cfg.speedup_over}, tdict, versions)
            teacher_lat = cache.get(key)
            if teacher_lat is None:
                teacher_lat = timed(teacher, ctx.work_dir / "latency" / f"teacher-{cfg.speedup_over}", cfg.speedup_over)
                keep(key, f"teacher-{cfg.speedup_over}", teacher_lat)
            teacher_ms = float(teacher_lat["p50_ms"])
            relative = teacher_ms / cfg.min_speedup
            if budget_ms is None or relative < budget_ms:
                budget_ms = relative
                budget_from = (f"min_speedup {cfg.min_speedup:g} (teacher {cfg.speedup_over} p50 {teacher_ms:.3f} ms "
                               f"/ {cfg.min_speedup:g} = {relative:.3f} ms)")
            log.info("search: latency budget %.3f ms from %s", budget_ms, budget_from)

        def evaluate(cand: Any) -> evolve.Trial:
            plan = plan_for(teacher, cand, scores, layers=cfg.inherit_layers, kept_vocab=kept_vocab)
            params = count_params(teacher, plan) + (shape.hidden if plan.vocab is not None else 0)  # + the dropped-token row
            note("max_params", params)
            trial = evolve.Trial(cand, feasible=False, params=params)
            if cfg.max_params is not None and params > cfg.max_params:
                trial.reason = f"params {params} > {cfg.max_params}"
                return trial
            shape_d = cand.to_dict()
            predicted = lat_model.predict(shape_d) if lat_model is not None else None
            trial.predicted_ms = predicted
            if predicted is not None and budget_ms is not None and predicted > budget_ms * (1 + cfg.latency_margin):
                trial.reason = f"predicted latency {predicted:.3f} ms > {budget_ms:.3f} ms (+{cfg.latency_margin:.0%})"
                return trial
            key = cache_key({**shape_d, **family_key, "task": task, "vocab_kept": len(kept_vocab) if cand.trim_vocab and kept_vocab else None},
                            tdict, versions)
            measured = cache.get(key)
            student = None
            if measured is None:
                student, _ = build_student(teacher, cand, scores, layers=cfg.inherit_layers, init=cfg.init,
                                           kept_vocab=kept_vocab, unk_id=unk, seed=seed)
                measured = timed(student, ctx.work_dir / "latency" / cand.key())
                trial.noisy = measured.get("noisy")
                keep(key, cand.key(), measured)
            else:
                trial.cached = True
            if lat_model is not None:
                lat_model.add(shape_d, measured["p50_ms"], predicted, noisy=bool(measured.get("noisy")))
            trial.latency_ms, trial.size_mb = measured["p50_ms"], measured["int8_mb"]
            note("max_latency_ms", trial.latency_ms)
            note("max_size_mb", trial.size_mb)
            if cfg.max_size_mb is not None and trial.size_mb > cfg.max_size_mb:
                trial.reason = f"int8 size {trial.size_mb:.2f} MB > {cfg.max_size_mb} MB"
                return trial
            if budget_ms is not None and trial.latency_ms > budget_ms:
                trial.reason = f"latency {trial.latency_ms:.3f} ms > {budget_ms:.3f} ms"
                return trial
            if student is None:
                student, _ = build_student(teacher, cand, scores, layers=cfg.inherit_layers, init=cfg.init,
                                           kept_vocab=kept_vocab, unk_id=unk, seed=seed)
            vb = remap_ids(score_batch, kept_vocab if cand.trim_vocab else None)
            if cfg.score == "diswot":
                res = diswot(student, vb)  # type: ignore[misc]
            elif cfg.score == "params":
                res = params_score(student)
            else:
                kd_b = [remap_ids(b, kept_vocab if cand.trim_vocab else None) for b in batches[1:] or batches]
                res = kd_score(student, teacher, kd_b, vb, task, steps=cfg.kd_steps, lr=cfg.kd_lr, seed=seed)
            trial.feasible, trial.score, trial.terms = True, res.score, res.terms
            log.info("search: %s score %.5f latency %.3f ms", cand.key(), res.score, trial.latency_ms)
            return trial

        with ctx.progress.task(f"{ctx.label}: {cfg.algorithm} over {space.size} shapes", None) as bar:
            def tracked(cand: Any) -> evolve.Trial:  # called once per distinct shape
                t = evaluate(cand)
                bar.advance(1, status=f"{cand.key()} {'ok' if t.feasible else t.reason}")
                return t

            memo = evolve.search(cfg.algorithm, space, tracked, population=cfg.population, sample=cfg.sample,
                                 iterations=cfg.iterations, seed=seed, time_budget_s=cfg.time_budget_s)
        trials = memo.distinct()
        chosen = evolve.best(trials)
        if chosen is None:
            raise InputError(self._nobody_fits(cfg, trials, seen_min, where, budget_ms, budget_from))
        front = evolve.pareto_front(trials)
        front_keys = {t.candidate for t in front}
        rows = [{**t.to_dict(), "pareto": t.candidate in front_keys} for t in trials]

        student, plan = build_student(teacher, chosen.candidate, scores, layers=cfg.inherit_layers, init=cfg.init,
                                      kept_vocab=kept_vocab, unk_id=unk, seed=seed)
        if kept_vocab is not None and chosen.candidate.trim_vocab:
            from compress.prune.vocab import trim_tokenizer

            pre = trim_tokenizer(pre, kept_vocab)
        feasible = [t for t in trials if t.feasible]
        budgets = ", ".join(f"{k} {v:.4g}" for k, v in (("p50 ms <=", budget_ms), ("params <=", cfg.max_params),
                                                      ("int8 MB <=", cfg.max_size_mb)) if v is not None) or "no budget"
        terms = ", ".join(f"{k} {v:.4g}" for k, v in chosen.terms.items())
        why = (f"highest {cfg.score} score ({chosen.score:.4g}: {terms}) of {len(feasible)} shapes meeting {budgets} "
               f"({len(trials)} distinct shapes evaluated, {len(trials) - len(feasible)} rejected); "
               f"p50 {chosen.latency_ms:.3f} ms, int8 {chosen.size_mb:.2f} MB, {chosen.params} params")
        if teacher_ms is not None:
            why += (f"; latency budget from {budget_from}" if budget_from != "max_latency_ms" else
                    f"; max_latency_ms is tighter than min_speedup {cfg.min_speedup:g} (teacher {teacher_ms:.3f} ms)")
            why += f"; {teacher_ms / chosen.latency_ms:.2f}x lower p50 than the teacher ({cfg.speedup_over})"
        if chosen.noisy:
            why += f"; its latency was measured under load ({chosen.noisy}) and not cached"
        lat_err = lat_model.error() if lat_model is not None else None
        if lat_err is not None:
            parts = []
            if lat_err.get("checked"):
                parts.append(f"mean error {lat_err['mean_abs_rel_error']:.0%} (max {lat_err['max_abs_rel_error']:.0%}) "
                             f"over {lat_err['checked']} predictions made before measuring")
            if lat_err.get("loo_points"):
                parts.append(f"leave-one-out {lat_err['loo_mean_abs_rel_error']:.0%} over {lat_err['loo_points']} "
                             "measured shapes")
            why += "; latency model: " + (", ".join(parts) if parts else
                                          f"not checked ({lat_err['measured']} clean measurements, too few to fit; "
                                          f"{lat_err['noisy_skipped']} noisy ones left out)")
        if cfg.latency_guard:
            why += (f"; load guard: {len(noisy)} of {cache.misses} measurements noisy (not cached), "
                    f"{cache.stale} stale cache entries measured again")
        adapter = get_adapter(student)
        ctx.metrics.update(
            chosen=chosen.candidate.key(), why=why, chosen_score=chosen.score, chosen_latency_ms=chosen.latency_ms,
            chosen_size_mb=chosen.size_mb, chosen_params=chosen.params, score_kind=cfg.score,
            chosen_shape=chosen.candidate.to_dict(), chosen_terms=dict(chosen.terms),
            inherited_layers=[k + 1 for k in (plan.layers if plan.layers is not None else range(shape.layers))],
            student_layers=adapter.num_layers, algorithm=cfg.algorithm, space=space.describe(), space_size=space.size,
            proposals=len(memo.history), evaluated=len(trials), feasible=len(feasible),
            quantize_embeddings=q_emb, latency_cache_hits=cache.hits, latency_cache_misses=cache.misses,
            latency_model=lat_err, latency_noisy=noisy, latency_cache_stale=cache.stale,
            latency_probe_baseline_ms=cache.baseline(),
            teacher_params=count_params(teacher), budget_latency_ms=budget_ms, budget_latency_from=budget_from,
            teacher_latency_ms=teacher_ms, speedup_over=cfg.speedup_over if teacher_ms is not None else None,
            pareto=[r for r in rows if r["pareto"]], trials=rows,
        )
        ctx.event("search_chosen", shape=chosen.candidate.key(), why=why)
        folder = ctx.save_student(student.cpu(), pre)
        if kept_vocab is not None and chosen.candidate.trim_vocab:  # distill feeds the teacher its original ids
            from compress.prune.idmap import save_id_map

            save_id_map(folder, [*kept_vocab, int(unk)])  # student id K (every dropped token) -> the teacher's [UNK]
        return artifact.replace(model_dir=folder)

    @staticmethod
    def _nobody_fits(cfg: SearchConfig, trials: list[Any], seen_min: dict[str, float], where: str,
                     budget_ms: float | None = None, budget_from: str = "max_latency_ms") -> str:
        relative = budget_from != "max_latency_ms"
        fix = {"max_latency_ms": "lower min_speedup" if relative else "raise max_latency_ms"}
        budgets = {"max_params": cfg.max_params, "max_size_mb": cfg.max_size_mb, "max_latency_ms": budget_ms}
        for name, budget in budgets.items():
            if budget is not None and name in seen_min and seen_min[name] > budget:
                label = budget_from if name == "max_latency_ms" and relative else f"{name} {budget:g}"
                return (f"{where}: {label}: no candidate meets it (smallest measured: {seen_min[name]:.4g} "
                        f"over {len(trials)} shapes); {fix.get(name, f'raise {name}')} or add smaller values to the space")
        predicted = [t.predicted_ms for t in trials if t.predicted_ms is not None and t.latency_ms is None]
        if predicted and budget_ms is not None:
            label = budget_from if relative else f"max_latency_ms {budget_ms:g}"
            return (f"{where}: {label}: no candidate meets it (smallest predicted "
                    f"{min(predicted):.4g} ms, smallest measured {seen_min.get('max_latency_ms', math.nan):.4g} ms); "
                    f"{fix['max_latency_ms'].split()[0]} it, add smaller values to the space or set latency_model false")
        mins = ", ".join(f"{k} {v:.4g}" for k, v in seen_min.items())
        return (f"{where}: no candidate meets every budget at once (smallest measured: {mins}); raise a budget or add "
                "smaller values to the space")
