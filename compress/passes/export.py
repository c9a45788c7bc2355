"""export: the student to ONNX (dynamo exporter, dynamic batch and sequence axes), ORT graph fusion
where it applies, and a parity check of ONNX Runtime against PyTorch on real inputs."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from compress.artifact import Artifact, ModelFile
from compress.contracts import Kind
from compress.errors import PassFailed
from compress.onnx.export import FUSION_MODEL_TYPES
from compress.passes.base import Pass, PassConfig, PassContext
from compress.passes.common import first_split, model_inputs, task_batches
from compress.registry import register
from compress.tasks import get_task


class ExportConfig(PassConfig):
    opset: int = Field(18, ge=14, description="ONNX opset.")
    optimize: bool = Field(True, description="Fuse attention/LayerNorm/GELU with ORT's transformer optimizer where it applies (kept only if parity holds).")
    atol: float = Field(1e-3, gt=0, description="Largest allowed absolute difference between ORT and PyTorch outputs.")
    min_cosine: float = Field(0.9999, gt=0, le=1, description="Smallest allowed cosine similarity between ORT and PyTorch outputs.")
    parity_examples: int = Field(8, gt=0, description="Real examples used for the parity check.")
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo", description="dynamo (torch.export) or legacy (TorchScript, eager attention): on a legacy graph ORT's "
        "transformer optimizer also fuses the attention blocks (BERT-like models), which dynamic int8 then runs "
        "as QAttention (benchmarks/README.md).")
    cache: bool = Field(False, description="causal-lm: export a decoder with past key/values (prefill and decode in one "
                        "graph, ORT/optimum input names; GPT-2, LLaMA, Qwen2) and check greedy generation parity "
                        "(docs/decoder.md).")
    parity_tokens: int = Field(20, gt=0, description="cache: greedy tokens per prompt that must match PyTorch generate.")


def sample_inputs(ctx: PassContext, model: Any, pre: Any, n: int, max_length: int = 32) -> dict[str, torch.Tensor]:
    """Real inputs from the data when there is some, else synthetic ones of the model's shape."""
    split = first_split(ctx, "eval", "calibration", "train")
    if split is not None:
        batch = next(iter(task_batches(ctx, split, pre, batch_size=n, max_length=max_length, limit=n, model=model)))
        return model_inputs(batch)
    synthetic = get_task(ctx.run.model.task).synthetic_inputs(model.config, batch_size=n, seq_len=max_length, seed=ctx.seed)
    return {k: torch.from_numpy(v) for k, v in synthetic.items()}


@register
class Export(Pass):
    """Export the student to ONNX fp32 and check ONNX Runtime against PyTorch."""

    type = "export"
    Config = ExportConfig
    version = "3"  # 2: typed model-file records in the artifact; 3: cache
    uses_data = ("eval", "calibration", "train")
    uses_edge = True  # target.edge changes what it makes (pipeline cache key)
    consumes = (Kind.TORCH_STUDENT,)
    produces = (Kind.ONNX, Kind.ONNX_FP32)
    drops = (Kind.ONNX_QUANTIZED, Kind.EVALUATION)  # the models (and their evaluation) of an older student

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.onnx.export import export_onnx, optimize_onnx
        from compress.onnx.parity import check_parity
        from compress.onnx.runtime import onnx_size_mb

        cfg: ExportConfig = self.config  # type: ignore[assignment]
        task = ctx.run.model.task
        model = ctx.load_student(artifact).eval()
        from compress.embed.hooks import export_model

        traced, output_name = export_model(model, artifact.model_dir, ctx.run)  # a sentence encoder, or the model
        pre = ctx.load_preprocessor(artifact)
        example = sample_inputs(ctx, model, pre, 2, max_length=16)
        check = sample_inputs(ctx, model, pre, cfg.parity_examples, max_length=ctx.run.model.max_length)
        if cfg.cache:
            return _export_decoder(self, artifact, ctx, model, check)
        if ctx.run.target.edge is not None:  # phone accelerators: fixed shapes, mobile-EP graph, .ort (docs/edge.md)
            from compress.onnx.edge import run_edge_export

            return run_edge_export(artifact, ctx, model, example, check, cfg)
        raw = ctx.out_dir / "student.raw.onnx"
        with ctx.progress.task(f"{ctx.label}: torch.onnx.export", total=None):
            export_onnx(traced, example, raw, task=task, opset=cfg.opset, exporter=cfg.exporter,
                        output_name=output_name)
        parity = check_parity(traced, raw, check, task=task, atol=cfg.atol, min_cosine=cfg.min_cosine)
        ctx.metrics.update(parity_max_abs_diff=parity.max_abs_diff, parity_cosine=parity.cosine)
        if not parity.ok:
            raise PassFailed(ctx.label, f"ONNX Runtime output '{parity.output}' differs from PyTorch: max abs diff "
                             f"{parity.max_abs_diff:.3g} (atol {cfg.atol}), cosine {parity.cosine:.6f} (min {cfg.min_cosine})")
        final = ctx.out_dir / "student.onnx"
        fused = False
        from compress.prune.reload import base_family, is_pruned_type

        mtype = FUSION_MODEL_TYPES.get(base_family(model.config))  # a compress_pruned_<family> fuses as its family
        if cfg.optimize and mtype:
            from compress.models import get_adapter

            ad = get_adapter(model)
            # per-layer head counts of a pruned type: 0 lets the optimizer read them from each attention's shapes
            heads, hidden = (0, 0) if is_pruned_type(model.config) else (ad.num_heads, ad.hidden_size)
            if optimize_onnx(raw, final, model_type=mtype, num_heads=heads, hidden_size=hidden):
                p2 = check_parity(traced, final, check, task=task, atol=cfg.atol, min_cosine=cfg.min_cosine)
                if p2.ok:
                    fused = True
                    ctx.metrics.update(fused_max_abs_diff=p2.max_abs_diff, fused_cosine=p2.cosine)
                else:
                    ctx.event("fusion_rejected", max_abs_diff=p2.max_abs_diff, cosine=p2.cosine)
        if fused:
            raw.unlink()
        else:
            final.unlink(missing_ok=True)
            raw.replace(final)
        ctx.metrics.update(fused=fused, size_mb=onnx_size_mb(final), opset=cfg.opset)
        # the new fp32 graph replaces every ONNX model made before (they came from an older student)
        return artifact.replace(models=[ModelFile(final, precision="fp32", method="export")], evaluation=None)


def _export_decoder(p: Export, artifact: Artifact, ctx: PassContext, model: Any, check: dict[str, torch.Tensor]) -> Artifact:
    """`cache: true`: the decoder with its KV cache (compress.onnx.decoder), logits and greedy generation parity."""
    from compress.errors import InputError
    from compress.onnx.decoder import check_decoder, export_decoder
    from compress.onnx.runtime import onnx_size_mb

    cfg: ExportConfig = p.config  # type: ignore[assignment]
    if ctx.run.model.task != "causal-lm":
        raise InputError(f"passes: '{ctx.label}'.cache: a KV cache needs model.task causal-lm (got {ctx.run.model.task})")
    final = ctx.out_dir / "student.onnx"
    with ctx.progress.task(f"{ctx.label}: torch.onnx.export (KV cache)", total=None):
        export_decoder(model, final, opset=cfg.opset)
    res = check_decoder(model, final, check, atol=cfg.atol, min_cosine=cfg.min_cosine, new_tokens=cfg.parity_tokens)
    ctx.metrics.update(parity_max_abs_diff=res.max_abs_diff, parity_cosine=res.cosine, cache=True,
                       generation_token_agreement=res.generation.token_agreement, size_mb=onnx_size_mb(final),
                       opset=cfg.opset, fused=False)
    if not res.ok:
        raise PassFailed(ctx.label, f"the ONNX decoder differs from PyTorch: logits max abs diff {res.max_abs_diff:.3g} "
                         f"(atol {cfg.atol}), cosine {res.cosine:.6f}; greedy tokens agree "
                         f"{res.generation.token_agreement:.1%}")
    return artifact.replace(models=[ModelFile(final, precision="fp32", method="export")], evaluation=None)
