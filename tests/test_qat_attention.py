"""QAT's optional attention quantization: Q and K^T (the scores' MatMul) and the probabilities and V (the
context's MatMul) fake-quantized through a registered attention function; the int8 export keeps parity and ORT
runs both activation x activation MatMuls on integer kernels. Tiny random BERT and LLaMA (GQA) from configs."""
from __future__ import annotations

import json

import pytest
import torch

from compress.cli import main
from tests.conftest import make_config
from tests.test_qat import QAT_PASS, _inputs, _parity, _tiny_classifier


def _attention_model(qk: bool, probs: bool, model=None):
    from compress.quant.fake import QuantSpec, calibrate, insert_fake_quant

    model = model if model is not None else _tiny_classifier()
    insert_fake_quant(model, QuantSpec(attention_qk=qk, attention_probs=probs))
    calibrate(model, [_inputs(8, seed=s) for s in (2, 3)])
    return model


@pytest.mark.parametrize("probs", [False, True], ids=["qk", "qk+probs"])
def test_attention_quant_parity_and_int8_kernels(tmp_path, probs):
    from compress.quant.export import INT8_MATMUL_OPS, export_qat_onnx, float_matmuls_behind_qdq, optimized_op_counts

    model = _attention_model(True, probs)
    path = tmp_path / "q.onnx"
    export_qat_onnx(model, _inputs(2), path, task="sequence-classification")
    res = _parity(model, path, _inputs(8, seed=5))
    # the attention quantization changes the function (else the parity above would not cover it)
    # (on average: on an AVX2 CPU without VNNI, ORT's integer kernels leave a few larger gaps, max 0.04)
    plain = _attention_model(False, False)
    with torch.no_grad():
        diff = float((model(**_inputs(8, seed=5)).logits - plain(**_inputs(8, seed=5)).logits).abs().mean())
    assert diff > 5 * max(res.mean_abs_diff, 1e-6)
    counts = optimized_op_counts(path, tmp_path / "q.opt.onnx")
    int8 = sum(counts.get(op, 0) for op in INT8_MATMUL_OPS)
    layer_linears = 2 * 6 + 2
    # QK^T of both layers on integer kernels; with probs also P x V (every MatMul of the graph)
    assert int8 == layer_linears + 2 * (2 if probs else 1), counts
    assert counts.get("MatMul", 0) + counts.get("FusedMatMul", 0) == (0 if probs else 2), counts
    assert float_matmuls_behind_qdq(tmp_path / "q.opt.onnx") == []


def test_capture_keeps_quantized_attention_and_float_probs():
    """The distillation objective captures attention maps through the adapter, which switches a model to eager
    attention unless its implementation returns probabilities: the quantized one must stay in place."""
    from compress.models import get_adapter
    from compress.quant.fake import ATTENTION_IMPL

    model = _attention_model(True, True)
    x = _inputs(4, seed=6)
    with torch.no_grad():
        plain = model(**x).logits
        with get_adapter(model).capture(attentions=True) as cap:
            captured = model(**x).logits
    assert model.config._attn_implementation == ATTENTION_IMPL
    assert torch.equal(plain, captured)
    probs = cap.attentions[0]
    assert probs.shape == (4, 4, 16, 16)
    # float probabilities (the KL takes their log): rows sum to 1 and the masked-out keys are tiny, not a grid
    assert torch.allclose(probs.sum(-1), torch.ones(4, 4, 16), atol=1e-5)
    assert float(probs[2:].min()) > 0


def test_strip_restores_plain_attention():
    from compress.quant.fake import strip_fake_quant

    model = _attention_model(True, True)
    before = model.config._attn_implementation
    strip_fake_quant(model)
    assert before != model.config._attn_implementation == "sdpa"
    assert not any("qat_attention" in k for k in model.state_dict())
    with torch.no_grad():  # no training happened: the float model again
        a = model(**_inputs(4, seed=6)).logits
        b = _tiny_classifier()(**_inputs(4, seed=6)).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_llama_gqa_attention_quant_exports_with_parity(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.onnx.parity import check_parity
    from compress.quant.export import INT8_MATMUL_OPS, export_qat_onnx, float_matmuls_behind_qdq, optimized_op_counts

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = _attention_model(True, True, LlamaForCausalLM(cfg).eval())
    path = tmp_path / "llama.onnx"
    export_qat_onnx(model, _inputs(2), path, task="causal-lm")
    res = check_parity(model, path, _inputs(4, seed=5), task="causal-lm", atol=0.05, min_cosine=0.9999)
    assert res.ok and res.mean_abs_diff < 5e-3, res
    counts = optimized_op_counts(path, tmp_path / "llama.opt.onnx")
    # q, k, v, o, gate, up, down of both layers, the LM head, and QK^T / PV of both layers
    assert sum(counts.get(op, 0) for op in INT8_MATMUL_OPS) == 2 * 7 + 1 + 2 * 2, counts
    assert float_matmuls_behind_qdq(tmp_path / "llama.opt.onnx") == []


def test_qat_pass_with_attention_quant(tmp_path, tiny_bert_dir, data_dir):
    qat = dict(QAT_PASS, quantize_qk=True, quantize_attention_probs=True)
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[qat])
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    m = next(p for p in json.loads((out / "report.json").read_text())["passes"] if p["type"] == "qat")["metrics"]
    assert m["parity_max_abs_diff"] <= 0.05 and m["float_weights_left"] == 0
    assert m["term_curves"]["attention"][0] < 0.3  # the float probabilities reach the attention KL
    scales = json.loads((out / "model" / "qat-scales.json").read_text())
    att = [k for k in scales if ".qat_attention." in k]
    assert len(att) == 2 * 4 and all(s["scale"] > 0 for k, s in scales.items() if k in att)
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved.get("_attn_implementation") in (None, "sdpa", "eager")  # the plain model is saved


def test_vit_fake_quant_exports_with_parity(tmp_path):
    """The image family through the same adapter path: every Linear and both attention MatMuls on integer
    kernels, parity; the patch embedding (a Conv2d, which QAT does not quantize) is the one float weight left."""
    from transformers import ViTConfig, ViTForImageClassification

    from compress.onnx.parity import check_parity
    from compress.onnx.runtime import load_model
    from compress.quant.export import (INT8_MATMUL_OPS, export_qat_onnx, float_matmuls_behind_qdq, float_weights,
                                       optimized_op_counts)
    from compress.quant.fake import QuantSpec, calibrate, insert_fake_quant

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(cfg).eval()
    insert_fake_quant(model, QuantSpec(attention_qk=True, attention_probs=True))
    g = torch.Generator().manual_seed(1)
    calibrate(model, [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g)} for _ in range(2)])
    path = tmp_path / "vit.onnx"
    export_qat_onnx(model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}, path, task="image-classification")
    res = check_parity(model, path, {"pixel_values": torch.randn(8, 3, 16, 16, generator=g)},
                       task="image-classification", atol=0.05, min_cosine=0.999)  # the qat pass's defaults
    assert res.ok and res.mean_abs_diff < 5e-3, res
    counts = optimized_op_counts(path, tmp_path / "vit.opt.onnx")
    assert sum(counts.get(op, 0) for op in INT8_MATMUL_OPS) == 2 * 6 + 1 + 2 * 2, counts  # + classifier, QK^T, PV
    assert float_matmuls_behind_qdq(tmp_path / "vit.opt.onnx") == []
    assert [n.rsplit(".", 2)[-2] for n in float_weights(load_model(path))] == ["projection"]
