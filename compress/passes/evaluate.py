"""evaluate: every ONNX student in ONNX Runtime on data.eval (task quality and fidelity to the teacher),
latency on `target`, size on disk and parameter count; the teacher in PyTorch as the reference."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from compress.artifact import Artifact
from compress.errors import InputError
from compress.passes.base import Pass, PassConfig, PassContext
from compress.passes.common import mean_pool, model_inputs, task_batches
from compress.registry import register

MAIN_METRIC = {
    "sequence-classification": ("accuracy", True),
    "image-classification": ("accuracy", True),
    "feature-extraction": ("retrieval_agreement", True),
    "causal-lm": ("perplexity", False),
}


class EvaluateConfig(PassConfig):
    max_examples: int | None = Field(2000, gt=0, description="Examples of data.eval used (None: all).")
    batch_size: int = Field(32, gt=0, description="Evaluation batch size.")
    latency: bool = Field(True, description="Measure ORT latency on `target`.")
    variants: list[str] | None = Field(None, description="Which ONNX students to evaluate (default: all, e.g. fp32, int8-dynamic, int8-static).")


@register
class Evaluate(Pass):
    """Measure the ONNX students in ONNX Runtime: quality, fidelity to the teacher, latency, size."""

    type = "evaluate"
    Config = EvaluateConfig
    version = "2"  # 2: quality_drop of perplexity is absolute (student minus teacher), as documented; was relative
    uses_data = ("eval",)
    uses_target = True

    def validate(self, run: Any) -> str | None:
        return None if run.data.eval is not None else "evaluate needs data.eval"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.models.loading import count_params, folder_size_mb
        from compress.onnx.runtime import make_session, measure_latency, onnx_size_mb, run_session

        cfg: EvaluateConfig = self.config  # type: ignore[assignment]
        task = ctx.run.model.task
        if not artifact.onnx:
            raise InputError(f"passes: '{ctx.label}' has no ONNX student to evaluate; put {{type: export}} before it")
        variants = {k: v for k, v in artifact.onnx.items() if k != "int8"}  # int8 is an alias of one of them
        if cfg.variants:
            missing = [v for v in cfg.variants if v not in artifact.onnx]
            if missing:
                raise InputError(f"passes: '{ctx.label}'.variants: {missing} not made; available: {sorted(artifact.onnx)}")
            variants = {k: artifact.onnx[k] for k in cfg.variants}

        teacher = ctx.load_teacher(artifact).eval()
        pre = ctx.load_preprocessor(artifact)
        batches = list(task_batches(ctx, "eval", pre, batch_size=cfg.batch_size, limit=cfg.max_examples, model=teacher))
        metric, higher = MAIN_METRIC[task]

        with torch.no_grad():
            t_out = [_output(teacher(**model_inputs(b)), task) for b in batches]
        teacher_scores = _score(task, batches, t_out, t_out)
        evaluation: dict[str, Any] = {
            "main_metric": metric,
            "higher_is_better": higher,
            "examples": sum(len(next(iter(b.values()))) for b in batches),
            "teacher": {
                "quality": teacher_scores[metric],
                **{k: v for k, v in teacher_scores.items() if k != "fidelity"},
                "params": count_params(teacher),
                "size_mb": folder_size_mb(artifact.teacher_dir) if artifact.teacher_dir else None,
            },
            "variants": {},
        }
        student_params = count_params(ctx.load_student(artifact)) if artifact.model_dir else None
        lat_inputs = self._latency_inputs(ctx, pre, teacher)

        with ctx.progress.task(f"{ctx.label}: ONNX Runtime", total=len(variants)) as bar:
            for name, path in variants.items():
                sess = make_session(path, provider=ctx.run.target.provider, threads=ctx.run.target.threads)
                s_out = [torch.from_numpy(next(iter(run_session(sess, _np(b)).values()))) for b in batches]
                scores = _score(task, batches, s_out, t_out)
                q = scores[metric]
                tq = teacher_scores[metric]
                drop = (tq - q) if higher else (q - tq)  # absolute, in the metric's units (config.Gates)
                stats: dict[str, Any] = {"quality": q, **scores, "quality_drop": drop,
                                         "size_mb": onnx_size_mb(path), "params": student_params}
                if cfg.latency:
                    lat = measure_latency(path, lat_inputs, provider=ctx.run.target.provider,
                                          threads=ctx.run.target.threads, warmup=ctx.run.target.warmup,
                                          runs=ctx.run.target.runs)
                    stats.update(latency_p50_ms=lat["p50_ms"], latency_p90_ms=lat["p90_ms"], latency_mean_ms=lat["mean_ms"])
                evaluation["variants"][name] = stats
                bar.advance(status=f"{name}: {metric} {q:.4g}")
        if "int8" in artifact.onnx:
            primary = next((k for k, v in artifact.onnx.items() if k != "int8" and v == artifact.onnx["int8"]), None)
            if primary in evaluation["variants"]:
                evaluation["variants"]["int8"] = dict(evaluation["variants"][primary], alias_of=primary)
        ctx.metrics.update(
            {f"{name}.{k}": v for name, s in evaluation["variants"].items() for k, v in s.items()
             if isinstance(v, (int, float)) and k in ("quality", "fidelity", "latency_p50_ms", "size_mb")},
            teacher_quality=evaluation["teacher"]["quality"],
        )
        extra = dict(artifact.extra, evaluation=evaluation)
        return artifact.replace(extra=extra)

    def _latency_inputs(self, ctx: PassContext, pre: Any, model: Any) -> dict[str, np.ndarray]:
        t = ctx.run.target
        if ctx.run.model.task == "image-classification":
            size = t.image_size or int(getattr(model.config, "image_size", 224))
            chans = int(getattr(model.config, "num_channels", 3))
            return {"pixel_values": np.random.default_rng(0).standard_normal((t.batch_size, chans, size, size)).astype(np.float32)}
        texts = list(ctx.data.records("eval").texts or ["hello world"])
        texts = (texts * (t.batch_size // max(len(texts), 1) + 1))[: t.batch_size]
        enc = pre(texts, padding="max_length", truncation=True, max_length=t.seq_len, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in enc.items()}


def _np(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model_inputs(batch).items()}


def _output(out: Any, task: str) -> torch.Tensor:
    return (out.last_hidden_state if task == "feature-extraction" else out.logits).float()


def _score(task: str, batches: list[dict[str, torch.Tensor]], s_out: list[torch.Tensor], t_out: list[torch.Tensor]) -> dict[str, float]:
    """Task quality of the student outputs and their fidelity to the teacher outputs."""
    if task in ("sequence-classification", "image-classification"):
        from sklearn.metrics import f1_score

        preds = torch.cat([o.argmax(-1) for o in s_out])
        tpreds = torch.cat([o.argmax(-1) for o in t_out])
        labels = torch.cat([b["labels"] for b in batches])
        return {
            "accuracy": float((preds == labels).float().mean()),
            "f1_macro": float(f1_score(labels.numpy(), preds.numpy(), average="macro")),
            "fidelity": float((preds == tpreds).float().mean()),
        }
    if task == "feature-extraction":
        se = torch.cat([mean_pool(o, b["attention_mask"]) for o, b in zip(s_out, batches)])
        te = torch.cat([mean_pool(o, b["attention_mask"]) for o, b in zip(t_out, batches)])
        cos = torch.nn.functional.cosine_similarity(se, te, dim=-1)

        def nearest(e: torch.Tensor) -> torch.Tensor:
            e = torch.nn.functional.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-2.0)
            return sim.argmax(-1)

        agree = float((nearest(se) == nearest(te)).float().mean()) if len(se) > 1 else 1.0
        return {"retrieval_agreement": agree, "cosine": float(cos.mean()), "fidelity": float(cos.mean())}
    # causal-lm: next-token perplexity on the label positions, and top-1 agreement with the teacher
    nll, count, agree = 0.0, 0, 0
    for o, t, b in zip(s_out, t_out, batches):
        logits, labels = o[:, :-1], b["labels"][:, 1:]
        valid = labels != -100
        lp = torch.log_softmax(logits.float(), -1)
        tok = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok[valid].sum())
        count += int(valid.sum())
        agree += int((o[:, :-1].argmax(-1) == t[:, :-1].argmax(-1))[valid].sum())
    return {"perplexity": float(np.exp(nll / max(count, 1))), "fidelity": agree / max(count, 1)}
