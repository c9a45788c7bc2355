"""ptq: post-training int8 quantization in ONNX Runtime, dynamic and static (QDQ, calibrated on
data.calibration). The baseline every training-based compression must beat."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.artifact import Artifact, ModelFile
from compress.contracts import Kind
from compress.errors import InputError
from compress.passes.base import Pass, PassConfig, PassContext
from compress.passes.common import first_split, model_inputs, task_batches
from compress.registry import register


class Int4(BaseModel):
    """int4 weight-only (MatMulNBits) settings: compress.onnx.int4."""

    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(32, description="Input rows per scale (a power of two >= 16 that divides every quantized MatMul's input dimension).")
    symmetric: bool = Field(True, description="Symmetric blocks (no zero point) or asymmetric (a 4-bit zero point per block).")
    accuracy_level: int | None = Field(None, description="MatMulNBits accuracy_level: None/0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute of the activations (fastest on x86).")
    lm_head: Literal["int4", "fp32"] = Field("int4", description="Precision of the LM head (the MatMul that makes the logits).")
    embeddings: Literal["fp32", "int4"] = Field("fp32", description="Precision of the embedding tables (int4: GatherBlockQuantized).")


class PTQConfig(PassConfig):
    methods: list[Literal["dynamic", "static", "int4"]] = Field(
        default_factory=lambda: ["dynamic", "static"], min_length=1,
        description="Which quantized models to make: dynamic int8 (weights int8, activations quantized at run time), static int8 (QDQ, calibrated), int4 (weight-only MatMulNBits, see `int4`).",
    )
    primary: Literal["dynamic", "static", "int4"] = Field("dynamic", description="Which one becomes the shipped student (student.int8.onnx / int4).")
    int4: Int4 = Field(None, description="int4 weight-only settings (when methods has int4); unset: block_size 32, symmetric, LM head int4, embeddings fp32.")  # type: ignore[assignment]
    per_channel: bool = Field(True, description="Per-channel weight scales (one per output column of each MatMul/Gemm), "
                              "for dynamic and static int8. ORT's own quantize_dynamic defaults to one scale per tensor: "
                              "on all-MiniLM-L6-v2 that keeps 0.953 cosine to the fp32 embeddings, per-channel 0.991, at "
                              "the same speed (docs/quantization.md).")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="Static activation type: uint8 (U8S8, ONNX Runtime's fast path on x86 CPUs: 5x faster "
        "than int8 activations on MiniLM) or int8 (S8S8, for GPU/NPU back-ends that want symmetric int8).")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Static calibration method.")
    quantize_embeddings: Literal["auto", True, False] = Field(
        "auto", description="Also store embedding tables (Gather) as int8: much smaller files (the word embeddings "
        "are most of a small encoder), at some latency cost in ONNX Runtime on CPU. auto: on for sentence-"
        "embedding students (docs/embeddings.md), off otherwise.")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights (and, static, 7-bit activations): for x86 CPUs without VNNI, where u8s8 "
        "int8 products summed in int16 can saturate (docs/quantization.md). auto: on when the CPU running the pass "
        "lacks VNNI (compress.onnx.cpu; part of the cache key).")
    static_outputs: Literal["float", "int8"] = Field(
        "float", description="Static int8: what a quantized MatMul/Gemm outputs. float: no QuantizeLinear after it, "
        "so ORT runs DQ -> MatMul as one MatMulIntegerToFloat kernel (fewer float<->int8 conversions, "
        "docs/quantization.md); int8: Q/DQ on outputs too (QLinearMatMul; what NNAPI/CoreML node units want, always "
        "used on edge targets).")
    calibration_examples: int = Field(128, gt=0, description="Examples read from data.calibration (else data.train).")
    batch_size: int = Field(8, gt=0, description="Calibration batch size.")


@register
class PTQ(Pass):
    """Post-training int8 quantization with ONNX Runtime (dynamic and static QDQ)."""

    type = "ptq"
    Config = PTQConfig
    # 4: typed model-file records in the artifact; 5: reduce_range; 6: int4 weight-only; 7: static int8 MatMuls with
    # float outputs (MatMulIntegerToFloat) by default, what ORT runs per method in the metrics; 8: reduce_range auto;
    # 9: per_channel applies to dynamic int8 too
    version = "9"
    uses_data = ("calibration", "train")
    uses_edge = True  # target.edge: weight MatMuls only, LayerNorm spelled out again, .ort (pipeline cache key)
    consumes = (Kind.ONNX_FP32,)
    refuses = (Kind.ONNX_QUANTIZED,)  # a graph that already holds Q/DQ (ptq, qat) is not quantized again
    produces = (Kind.ONNX_QUANTIZED,)

    def validate(self, run: Any) -> str | None:
        cfg: PTQConfig = self.config  # type: ignore[assignment]
        if cfg.primary not in cfg.methods:
            return f"primary: '{cfg.primary}' is not among methods {cfg.methods}"
        if run.target.edge is not None and "dynamic" in cfg.methods:
            return ("methods: dynamic int8 (DynamicQuantizeLinear, MatMulInteger) has no NNAPI/CoreML kernels; "
                    "an edge target (target.edge) takes methods: [static], primary: static")
        if "static" in cfg.methods and run.data.calibration is None and run.data.train is None:
            return "static quantization needs data.calibration (or data.train) to calibrate on"
        return None

    def reads_from_run(self, run: Any) -> Any:
        from compress.onnx.cpu import reduce_range_key

        return reduce_range_key(self.config.reduce_range)  # type: ignore[attr-defined]

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.onnx.quantize import quantize_dynamic_int8, quantize_static_qdq
        from compress.onnx.parity import cosine_similarity
        from compress.onnx.runtime import make_session, onnx_size_mb, run_session

        from compress.onnx.cpu import resolve_reduce_range

        cfg: PTQConfig = self.config  # type: ignore[assignment]
        reduce_range = resolve_reduce_range(cfg.reduce_range)
        ctx.metrics["reduce_range"] = reduce_range
        ctx.metrics["per_channel"] = cfg.per_channel
        fp32 = artifact.fp32_onnx()
        if fp32 is None:
            raise InputError(f"passes: '{ctx.label}' needs an fp32 ONNX model; put {{type: export}} before it")
        done = [m.name for m in artifact.models if m.quantized]
        if done:
            raise InputError(f"passes: '{ctx.label}': the artifact already holds quantized models ({', '.join(done)}); "
                             "quantizing again is not supported")
        src = fp32.path
        calib: list[dict[str, Any]] | None = None
        # calibration inputs: static calibration, and a fidelity check of each int8 model against fp32
        split = first_split(ctx, "calibration", "train")
        if split is not None:
            pre = ctx.load_preprocessor(artifact)
            model = ctx.load_student(artifact) if ctx.run.model.task == "image-classification" else None
            calib = [
                model_inputs(b)
                for b in task_batches(ctx, split, pre, batch_size=cfg.batch_size, limit=cfg.calibration_examples, model=model)
            ]
        if calib is not None and ctx.run.target.edge is not None:  # a fixed-shape graph takes its own shapes
            from compress.onnx.edge import fit_batches

            calib = fit_batches(calib, src)
        q_emb = cfg.quantize_embeddings
        if q_emb == "auto":
            from compress.embed.hooks import quantize_embeddings_default

            q_emb = quantize_embeddings_default(artifact, ctx.run)
        ctx.metrics["quantize_embeddings"] = q_emb
        op_types = ("MatMul", "Gemm", "Gather") if q_emb else ("MatMul", "Gemm")
        made: dict[str, Any] = {}  # method -> path
        with ctx.progress.task(f"{ctx.label}: quantizing", total=len(cfg.methods)) as bar:
            for method in cfg.methods:
                dst = ctx.out_dir / (f"student.int8-{method}.onnx" if method != "int4" else "student.int4-weight-only.onnx")
                if method == "int4":
                    from compress.onnx.int4 import quantize_int4

                    o = cfg.int4 or Int4()
                    counts = quantize_int4(src, dst, block_size=o.block_size, symmetric=o.symmetric,
                                           accuracy_level=o.accuracy_level, lm_head_precision=o.lm_head,
                                           embeddings=o.embeddings)
                    ctx.metrics.update({f"int4_{k}": v for k, v in counts.items()})
                elif method == "dynamic":
                    quantize_dynamic_int8(src, dst, op_types=op_types, reduce_range=reduce_range,
                                         per_channel=cfg.per_channel)
                else:
                    assert calib is not None
                    edge = ctx.run.target.edge is not None
                    quantize_static_qdq(src, dst, calib, per_channel=cfg.per_channel, method=cfg.calibration,
                                        op_types=op_types, activations=cfg.activations, reduce_range=reduce_range,
                                        weight_matmuls_only=edge, float_outputs=cfg.static_outputs == "float" and not edge)
                made[method] = dst
                bar.advance()
        if ctx.run.target.edge is not None and calib:  # LayerNorm spelled out again, the .ort file (docs/edge.md)
            from compress.onnx.edge import finish_quantized

            for method, path in made.items():
                ctx.metrics[f"{method}_edge"] = finish_quantized(path, calib)
        models = [*artifact.models, *(ModelFile(path, precision="int4" if method == "int4" else "int8",
                                                method="weight-only" if method == "int4" else method,
                                                shipped=method == cfg.primary)
                                      for method, path in made.items())]
        # fidelity of each int8 model to the fp32 one on the calibration inputs
        if calib:
            ref_sess = make_session(src)
            refs = [next(iter(run_session(ref_sess, b).values())) for b in calib[:4]]
            for method, path in made.items():
                sess = make_session(path)
                outs = [next(iter(run_session(sess, b).values())) for b in calib[:4]]
                cos = float(np.mean([cosine_similarity(a, b) for a, b in zip(outs, refs)]))
                ctx.metrics[f"{method}_cosine_to_fp32"] = cos
        for method, path in made.items():
            ctx.metrics[f"{method}_size_mb"] = onnx_size_mb(path)
            if method != "int4" and ctx.run.target.edge is None:  # what ORT runs (the report's static vs dynamic note)
                from compress.onnx.quantize import runtime_summary

                ctx.metrics[f"{method}_runs"] = runtime_summary(path, ctx.work_dir / f"{method}.optimized.onnx",
                                                                threads=ctx.run.target.threads or 1)
        ctx.metrics["fp32_size_mb"] = onnx_size_mb(src)
        return artifact.replace(models=models)

