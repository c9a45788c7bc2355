"""evaluate: every ONNX student in ONNX Runtime on data.eval (task quality and fidelity to the teacher),
latency on `target`, size on disk and parameter count; the teacher in PyTorch as the reference, and the teacher in
ONNX Runtime (fused fp32, dynamic int8: compress.onnx.baselines) as the baselines the ratios are taken against.
Every ONNX model, teacher and students, is timed in the same interleaved rounds."""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field

from compress.artifact import Artifact, Evaluation
from compress.contracts import Kind
from compress.errors import InputError
from compress.passes.base import Pass, PassConfig, PassContext
from compress.passes.common import first_split, model_inputs, task_batches
from compress.registry import register
from compress.tasks import get_task

log = logging.getLogger(__name__)


class EvaluateConfig(PassConfig):
    max_examples: int | None = Field(2000, gt=0, description="Examples of data.eval used (None: all).")
    batch_size: int = Field(32, gt=0, description="Evaluation batch size.")
    latency: bool = Field(True, description="Measure ORT latency on `target`.")
    variants: list[str] | None = Field(None, description="Which ONNX students to evaluate (default: all, e.g. fp32, int8-dynamic, int8-static; int8 is the shipped one).")
    teacher_baselines: bool = Field(
        True, description="Also measure the teacher in ONNX Runtime: fp32 from ORT's transformer-optimized graph and its "
        "dynamic int8 (the baseline a user would otherwise ship), with the students' ratios against the fp32 teacher "
        "(compress.onnx.baselines). Skipped, with the reason in the metrics, for causal-lm decoders and edge targets.")
    baseline_methods: list[Literal["dynamic", "static"]] = Field(
        default_factory=lambda: ["dynamic"], description="Quantized teacher baselines made next to the fp32 one "
        "(static: QDQ U8S8 calibrated on data.calibration, else data.train).")
    ship: Literal["last", "fastest"] = Field(
        "last", description="Which quantized student ships as student.<precision>.onnx. last: the one the last quantizer "
        "made (its `primary`). fastest: of the evaluated students of the same precision whose quality is at most "
        "ship_tolerance below the last quantizer's, the one timed fastest here (the median of per-round speedups over "
        "the fp32 teacher, else the p50); the others stay in the run folder under their method's name.")
    ship_tolerance: float = Field(0.005, ge=0, description="ship: fastest: how much worse, in the main metric's units "
                                  "(accuracy 0.005 = half a point), a faster student may be than the last quantizer's.")
    ship_margin: float = Field(0.10, ge=0, le=1, description="ship: fastest: how much faster (0.10 = 10%, by the "
                               "measure it compares) another student must be to ship instead of the last quantizer's. A "
                               "smaller lead is within the timing noise of a CPU host (two demo runs on one host measured "
                               "the same two int8 files 7% apart one way and 13% the other) and would flip the shipped "
                               "file between runs of the same config.")
    latency_rounds: int = Field(5, gt=0, description="Teacher and students are timed interleaved, in this many rounds of "
                                "target.runs / rounds runs each (a noisy host slows them alike); ratios are the median "
                                "of the per-round ratios.")


@register
class Evaluate(Pass):
    """Measure the ONNX students in ONNX Runtime: quality, fidelity to the teacher, latency, size."""

    type = "evaluate"
    Config = EvaluateConfig
    # 2: quality_drop of perplexity is absolute (student minus teacher), as documented; was relative
    # 3: reads and writes typed model-file records and the typed evaluation
    # 4: causal-lm decoders: top-1 agreement / perplexity increase vs fp32, prefill ms, decode tokens/s
    # 5: the teacher in ORT (fp32 fused, dynamic int8) as baselines; all models timed interleaved in rounds;
    #    latency_x / size_x against the fp32 ORT teacher
    # 6: each model's block of an interleaved round starts with untimed re-warm runs (runtime.measure_latency_rounds)
    # 7: ship: fastest (the shipped flag can move to a faster student of the same precision)
    # 8: ship_margin: a lead within it keeps the last quantizer's file
    # 9: one ORT session alive at a time in the latency rounds (idle sessions side by side slowed the timed one)
    version = "9"
    uses_data = ("eval",)
    uses_target = True
    consumes = (Kind.ONNX, Kind.TEACHER)
    produces = (Kind.EVALUATION,)

    def validate(self, run: Any) -> str | None:
        if run.data.eval is None:
            return "evaluate needs data.eval"
        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        if cfg.ship == "fastest" and not cfg.latency:
            return "ship: fastest needs the latency it compares; set latency: true or ship: last"
        if cfg.ship == "fastest" and run.target.edge is not None:
            return ("ship: fastest compares CPU latency, but an edge target ships the file its accelerator runs; "
                    "remove ship or the target's edge")
        return None

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.models.loading import count_params, folder_size_mb
        from compress.onnx.runtime import onnx_size_mb

        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        task = get_task(ctx.run.model.task)
        if not artifact.models:
            raise InputError(f"passes: '{ctx.label}' has no ONNX student to evaluate; put {{type: export}} before it")
        models = list(artifact.models)
        if cfg.variants:
            shipped = artifact.shipped()
            by_name = {m.name: m for m in models}
            if shipped is not None and shipped.quantized:
                by_name.setdefault(shipped.precision, shipped)  # `int8`: the shipped int8 model
            missing = [v for v in cfg.variants if v not in by_name]
            if missing:
                raise InputError(f"passes: '{ctx.label}'.variants: {missing} not made; available: {sorted(by_name)}")
            models = list({by_name[v].name: by_name[v] for v in cfg.variants}.values())

        teacher = ctx.load_teacher(artifact).eval()
        pre = ctx.load_preprocessor(artifact)
        batches = list(task_batches(ctx, "eval", pre, batch_size=cfg.batch_size, limit=cfg.max_examples, model=teacher))
        metric, higher = task.metric, task.higher_is_better

        t_batches = batches
        from compress.prune.idmap import load_id_map

        if load_id_map(artifact.model_dir) is not None and artifact.teacher_dir is not None:
            # a vocabulary-trimmed student: the teacher reads the same texts through its own tokenizer (same
            # tokens, original ids), so its reference and the fidelity compare like with like
            from compress.models.loading import load_preprocessor

            t_batches = list(task_batches(ctx, "eval", load_preprocessor(str(artifact.teacher_dir)),
                                          batch_size=cfg.batch_size, limit=cfg.max_examples, model=teacher))
        from compress.embed.hooks import check_retrieval_gate, sentence_eval

        n_examples = sum(len(next(iter(b.values()))) for b in batches)
        check_retrieval_gate(ctx.run, n_examples)
        sentence = sentence_eval(artifact, ctx, teacher, cfg.max_examples)  # sentence embeddings (compress.embed)
        score = sentence.score if sentence is not None else task.score
        if sentence is not None:
            t_out = sentence.teacher_outputs(t_batches)
        else:
            with torch.no_grad():
                t_out = [_output(teacher(**model_inputs(b)), task.output) for b in t_batches]
        teacher_scores = score(batches, t_out, t_out)
        evaluation = Evaluation(
            main_metric=metric,
            higher_is_better=higher,
            examples=n_examples,
            teacher={
                "quality": teacher_scores[metric],
                **{k: v for k, v in teacher_scores.items() if k != "fidelity"},
                "params": count_params(teacher),
                "size_mb": folder_size_mb(artifact.teacher_dir) if artifact.teacher_dir else None,
            },
        )
        student = ctx.load_student(artifact) if artifact.model_dir else None
        student_params = count_params(student) if student is not None else None
        t = ctx.run.target
        # the student's config: a vocabulary-trimmed student takes fewer token ids than the teacher
        lat_inputs = task.synthetic_inputs((student if student is not None else teacher).config, batch_size=t.batch_size, seq_len=t.seq_len,
                                           image_size=t.image_size)

        outputs: dict[str, list[torch.Tensor]] = {}
        from compress.onnx.edge import edge_stats, fixed_latency_inputs

        baselines = self._baselines(artifact, ctx, teacher, t_batches, t_out, teacher_scores, score, evaluation)
        timed: dict[str, Any] = {}  # name -> (path, latency inputs), teacher baselines first
        for b in baselines:
            timed[BASELINE_PREFIX + b.name] = (b.path, task.synthetic_inputs(
                teacher.config, batch_size=t.batch_size, seq_len=t.seq_len, image_size=t.image_size))

        with ctx.progress.task(f"{ctx.label}: ONNX Runtime", total=len(models)) as bar:
            for m in models:
                s_out, scores = _score_onnx(m.path, t, batches, score, t_out, teacher_scores[metric], metric, higher)
                if task.name == "causal-lm":
                    outputs[m.name] = s_out
                q = scores["quality"]
                stats: dict[str, Any] = {**scores, "size_mb": onnx_size_mb(m.path), "params": student_params}
                if ctx.run.target.edge is not None:  # mobile usability per EP, the .ort file's quality (docs/edge.md)
                    stats.update(edge_stats(m.path, [model_inputs(b) for b in batches], s_out,
                                            lambda outs: score(batches, outs, t_out), metric, t.threads))
                timed[m.name] = (m.path, fixed_latency_inputs(m.path, lat_inputs))
                evaluation.models[m.name] = stats
                bar.advance(status=f"{m.name}: {metric} {q:.4g}")
        if cfg.latency:
            self._latency(ctx, timed, evaluation)
        if outputs:  # decoders: quantized vs fp32 agreement and perplexity, prefill ms and decode tokens/s
            from compress.onnx.decoder import causal_lm_stats

            causal_lm_stats(evaluation, models, outputs, batches, t, latency=cfg.latency)
        if cfg.ship == "fastest":
            artifact, ctx.metrics["ship"] = ship_fastest(artifact, evaluation, cfg.ship_tolerance, cfg.ship_margin)
            log.info("%s: %s", ctx.label, ctx.metrics["ship"])
        rep = evaluation.report(artifact.shipped())
        ctx.metrics.update(
            {f"{name}.{k}": v for name, s in {**rep["variants"], **rep["baselines"]}.items() for k, v in s.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k in ("quality", "fidelity", "latency_p50_ms", "size_mb", "latency_x")},
            teacher_quality=evaluation.teacher["quality"],
        )
        return artifact.replace(evaluation=evaluation)

    # ---------------------------------------------------------------------------------------------- baselines
    def _baselines(self, artifact: Artifact, ctx: PassContext, teacher: Any, t_batches: list[Any], t_out: list[Any],
                   teacher_scores: dict[str, Any], score: Any, evaluation: Evaluation) -> list[Any]:
        """The teacher in ORT (compress.onnx.baselines), scored on the teacher's eval batches: quality, fidelity to the
        PyTorch teacher, size, params. Files in this step's out_dir (cached with it). [] when they do not apply."""
        from compress.models.loading import count_params
        from compress.onnx.baselines import teacher_baselines, why_not
        from compress.onnx.runtime import onnx_size_mb

        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        run = ctx.run
        if not cfg.teacher_baselines:
            return []
        reason = why_not(run.model.task, edge=run.target.edge is not None)
        if reason is None and artifact.teacher_dir is None:
            reason = "teacher baselines: the artifact has no teacher folder"
        if reason is None and "static" in cfg.baseline_methods and first_split(ctx, "calibration", "train") is None:
            reason = "teacher baselines: static int8 needs data.calibration or data.train"
        if reason is not None:
            log.info("%s: %s", ctx.label, reason)
            ctx.metrics["teacher_baselines"] = reason
            return []
        from compress.embed.hooks import export_model

        traced, output_name = export_model(teacher, artifact.teacher_dir, run)  # a sentence encoder, or the teacher
        example = {k: v[:2] for k, v in model_inputs(t_batches[0]).items()}
        calib = None
        if "static" in cfg.baseline_methods:
            from compress.models.loading import load_preprocessor

            split = first_split(ctx, "calibration", "train")
            calib = [model_inputs(b) for b in task_batches(ctx, split, load_preprocessor(str(artifact.teacher_dir)),
                                                           batch_size=8, limit=128, model=teacher)]
        with ctx.progress.task(f"{ctx.label}: teacher baselines (export, fuse, quantize)", total=None):
            made = teacher_baselines(artifact.teacher_dir, run.model.task, ctx.out_dir / "baselines", run.target,
                                     methods=("fp32", *cfg.baseline_methods), calibration=calib, model=traced,
                                     example_inputs=example, output_name=output_name)
        metric, higher = evaluation.main_metric, evaluation.higher_is_better
        params = count_params(teacher)
        for b in made:
            _, scores = _score_onnx(b.path, run.target, t_batches, score, t_out, teacher_scores[metric], metric, higher)
            evaluation.baselines[BASELINE_PREFIX + b.name] = {
                **scores, "size_mb": onnx_size_mb(b.path),
                "params": params, "label": b.label, "precision": b.precision, "method": b.method, "fused": b.fused}
        ctx.metrics["teacher_baselines"] = [BASELINE_PREFIX + b.name for b in made]
        return made

    def _latency(self, ctx: PassContext, timed: dict[str, Any], evaluation: Evaluation) -> None:
        """Every model in `timed` timed interleaved (compress.onnx.runtime.measure_latency_rounds); ratios against the
        fp32 ORT teacher when it was made: latency_x (median of per-round ratios) and size_x."""
        from compress.onnx.runtime import measure_latency_rounds

        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        t = ctx.run.target
        ref = BASELINE_PREFIX + "fp32"
        ref = ref if ref in timed else None
        with ctx.progress.task(f"{ctx.label}: latency ({len(timed)} models, {cfg.latency_rounds} interleaved rounds)",
                               total=None):
            lat = measure_latency_rounds({n: p for n, (p, _) in timed.items()}, {n: i for n, (_, i) in timed.items()},
                                         provider=t.provider, threads=t.threads, warmup=t.warmup, runs=t.runs,
                                         rounds=cfg.latency_rounds, reference=ref)
        ref_size = evaluation.baselines[ref]["size_mb"] if ref else None
        for name, s in lat.items():
            stats = evaluation.baselines.get(name) if name.startswith(BASELINE_PREFIX) else evaluation.models[name]
            assert stats is not None
            stats.update(latency_p50_ms=s["p50_ms"], latency_p90_ms=s["p90_ms"], latency_mean_ms=s["mean_ms"],
                         latency_rounds=s["rounds"])
            if ref is not None:
                stats.update(latency_x=s["speedup"], size_x=ref_size / stats["size_mb"] if stats.get("size_mb") else None)


BASELINE_PREFIX = "teacher-"  # evaluation.baselines keys: teacher-fp32, teacher-int8-dynamic, teacher-int8-static


def ship_fastest(artifact: Artifact, evaluation: Evaluation, tolerance: float,
                 margin: float) -> tuple[Artifact, str]:
    """`ship: fastest`: the artifact with the shipped flag on the fastest evaluated student of the shipped one's
    precision whose quality drop is at most `tolerance` above the shipped one's and whose speed is more than
    1 + `margin` times the shipped one's, and a line saying what was chosen and why. Speed: latency_x (median of
    per-round speedups over the fp32 teacher) when every candidate has it, else 1 / p50. The artifact is returned
    unchanged when nothing quantized ships or nothing else qualifies."""
    import dataclasses

    last = artifact.shipped()
    if last is None or not last.quantized or last.name not in evaluation.models:
        return artifact, "ship: fastest: no evaluated quantized student ships; nothing to choose"
    stats = evaluation.models
    peers = [m for m in artifact.models if m.precision == last.precision and m.format == last.format
             and stats.get(m.name, {}).get("latency_p50_ms") is not None]
    by_x = all(stats[m.name].get("latency_x") for m in peers)

    def speed(m: Any) -> float:
        return stats[m.name]["latency_x"] if by_x else 1.0 / stats[m.name]["latency_p50_ms"]

    what = "speedup over the fp32 teacher" if by_x else "1 / p50"
    limit = stats[last.name]["quality_drop"] + tolerance
    ok = [m for m in peers if stats[m.name]["quality_drop"] <= limit + 1e-12]
    best = max(ok, key=speed, default=last)
    lost = [m for m in peers if m not in ok and speed(m) > speed(last)]
    worse = "".join(f"; {m.name} was faster ({speed(m) / speed(last):.2f}x) but its quality drop "
                    f"{stats[m.name]['quality_drop']:.4g} exceeds {stats[last.name]['quality_drop']:.4g} + the "
                    f"tolerance {tolerance:g}" for m in lost)
    if best.name == last.name:
        return artifact, (f"ship: fastest: {last.name} stays: the fastest (by {what}) of {[m.name for m in ok]}, the "
                          f"students within {tolerance:g} of its quality{worse}")
    lead = speed(best) / speed(last)
    if lead <= 1 + margin:
        return artifact, (f"ship: fastest: {last.name} stays: {best.name} measured {lead:.2f}x its speed (by {what}), "
                          f"a lead within the ship_margin {margin:g} that timing noise spans{worse}")
    line = (f"ship: fastest: {best.name} ships instead of {last.name}: {lead:.2f}x its speed (by {what}, more than the "
            f"ship_margin {margin:g}), quality drop {stats[best.name]['quality_drop']:.4g} vs "
            f"{stats[last.name]['quality_drop']:.4g} (tolerance {tolerance:g})")
    models = [dataclasses.replace(m, shipped=m.name == best.name) if m.precision == last.precision else m
              for m in artifact.models]
    return artifact.replace(models=models), line


def _score_onnx(path: Any, target: Any, batches: list[Any], score: Any, t_out: list[Any], teacher_quality: float,
                metric: str, higher: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run an ONNX file on the eval batches and score it against the teacher's outputs: (its outputs, {quality,
    every score, quality_drop}). The drop is absolute, in the metric's units (config.Gates)."""
    from compress.onnx.edge import run_fixed
    from compress.onnx.runtime import make_session

    sess = make_session(path, provider=target.provider, threads=target.threads)
    # run_fixed: a fixed-shape edge graph gets the batches regrouped to its shapes; others as they are
    outs = [torch.from_numpy(next(iter(run_fixed(sess, model_inputs(b)).values()))) for b in batches]
    scores = score(batches, outs, t_out)
    q = scores[metric]
    return outs, {"quality": q, **scores,
                  "quality_drop": (teacher_quality - q) if higher else (q - teacher_quality)}


def _output(out: Any, name: str) -> torch.Tensor:
    return getattr(out, name).float()
