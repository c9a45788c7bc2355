"""evaluate: every ONNX student in ONNX Runtime on data.eval (task quality and fidelity to the teacher),
latency on `target`, size on disk and parameter count; the teacher in PyTorch as the reference."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from compress.artifact import Artifact, Evaluation
from compress.contracts import Kind
from compress.errors import InputError
from compress.passes.base import Pass, PassConfig, PassContext
from compress.passes.common import model_inputs, task_batches
from compress.registry import register
from compress.tasks import get_task


class EvaluateConfig(PassConfig):
    max_examples: int | None = Field(2000, gt=0, description="Examples of data.eval used (None: all).")
    batch_size: int = Field(32, gt=0, description="Evaluation batch size.")
    latency: bool = Field(True, description="Measure ORT latency on `target`.")
    variants: list[str] | None = Field(None, description="Which ONNX students to evaluate (default: all, e.g. fp32, int8-dynamic, int8-static; int8 is the shipped one).")


@register
class Evaluate(Pass):
    """Measure the ONNX students in ONNX Runtime: quality, fidelity to the teacher, latency, size."""

    type = "evaluate"
    Config = EvaluateConfig
    # 2: quality_drop of perplexity is absolute (student minus teacher), as documented; was relative
    # 3: reads and writes typed model-file records and the typed evaluation
    # 4: causal-lm decoders: top-1 agreement / perplexity increase vs fp32, prefill ms, decode tokens/s
    version = "4"
    uses_data = ("eval",)
    uses_target = True
    consumes = (Kind.ONNX, Kind.TEACHER)
    produces = (Kind.EVALUATION,)

    def validate(self, run: Any) -> str | None:
        return None if run.data.eval is not None else "evaluate needs data.eval"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.models.loading import count_params, folder_size_mb
        from compress.onnx.runtime import make_session, measure_latency, onnx_size_mb

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
        from compress.onnx.edge import edge_stats, fixed_latency_inputs, run_fixed

        with ctx.progress.task(f"{ctx.label}: ONNX Runtime", total=len(models)) as bar:
            for m in models:
                sess = make_session(m.path, provider=t.provider, threads=t.threads)
                # run_fixed: a fixed-shape edge graph gets the batches regrouped to its shapes; others as they are
                s_out = [torch.from_numpy(next(iter(run_fixed(sess, model_inputs(b)).values()))) for b in batches]
                if task.name == "causal-lm":
                    outputs[m.name] = s_out
                scores = score(batches, s_out, t_out)
                q = scores[metric]
                tq = teacher_scores[metric]
                drop = (tq - q) if higher else (q - tq)  # absolute, in the metric's units (config.Gates)
                stats: dict[str, Any] = {"quality": q, **scores, "quality_drop": drop,
                                         "size_mb": onnx_size_mb(m.path), "params": student_params}
                if ctx.run.target.edge is not None:  # mobile usability per EP, the .ort file's quality (docs/edge.md)
                    stats.update(edge_stats(m.path, [model_inputs(b) for b in batches], s_out,
                                            lambda outs: score(batches, outs, t_out), metric, t.threads))
                if cfg.latency:
                    lat = measure_latency(m.path, fixed_latency_inputs(m.path, lat_inputs), provider=t.provider, threads=t.threads,
                                          warmup=t.warmup, runs=t.runs)
                    stats.update(latency_p50_ms=lat["p50_ms"], latency_p90_ms=lat["p90_ms"], latency_mean_ms=lat["mean_ms"])
                evaluation.models[m.name] = stats
                bar.advance(status=f"{m.name}: {metric} {q:.4g}")
        if outputs:  # decoders: quantized vs fp32 agreement and perplexity, prefill ms and decode tokens/s
            from compress.onnx.decoder import causal_lm_stats

            causal_lm_stats(evaluation, models, outputs, batches, t, latency=cfg.latency)
        variants = evaluation.report(artifact.shipped())["variants"]
        ctx.metrics.update(
            {f"{name}.{k}": v for name, s in variants.items() for k, v in s.items()
             if isinstance(v, (int, float)) and k in ("quality", "fidelity", "latency_p50_ms", "size_mb")},
            teacher_quality=evaluation.teacher["quality"],
        )
        return artifact.replace(evaluation=evaluation)


def _output(out: Any, name: str) -> torch.Tensor:
    return getattr(out, name).float()
