"""QAT: fake quantization through the model adapters, the int8 QDQ export ORT runs on integer kernels, the
qat pass through `compress run`, and its bad inputs. Tiny random models; real ONNX Runtime sessions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress.cli import main
from compress.errors import InputError
from tests.conftest import make_config


def _tiny_classifier(hidden: int = 64, layers: int = 2, vocab: int = 1000, seed: int = 0, init: float = 0.2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3,
                     initializer_range=init)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # non-zero biases, as in a trained model (the exporter folds zero biases away)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0, init)
    return model


def _inputs(n: int, seq: int = 16, vocab: int = 1000, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, seq // 2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


def _quantized(spec=None, **kw):
    from compress.quant.fake import QuantSpec, calibrate, insert_fake_quant

    model = _tiny_classifier(**kw)
    insert_fake_quant(model, spec or QuantSpec())
    calibrate(model, [_inputs(8, seed=s) for s in (2, 3)])
    return model


def _parity(model, path, inputs):
    """ORT int8 vs the fake-quant model: equal up to float rounding (~1e-7) except where an activation sits on a
    rounding tie that ORT's QuantizeLinear (x / scale) and torch (x * (1 / scale)) break apart: one quantization
    step on one value, ~0.02 on these logits of size ~2. Hence a loose max and a tight mean."""
    from compress.onnx.parity import check_parity

    res = check_parity(model, path, inputs, task="sequence-classification", atol=0.05, min_cosine=0.9999)
    assert res.ok and res.mean_abs_diff < 5e-3, res
    return res


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from compress.quant.export import export_qat_onnx

    tmp = tmp_path_factory.mktemp("qat-export")
    model = _quantized()
    path = tmp / "q.onnx"
    changes = export_qat_onnx(model, _inputs(2), path, task="sequence-classification")
    return model, path, changes, tmp


def test_ort_int8_matches_fake_quant_model(exported):
    from compress.onnx.parity import check_parity

    model, path, _, _ = exported
    check = _inputs(8, seed=5)
    res = _parity(model, path, check)
    # and the fake quantization does change the function (else parity would prove nothing)
    float_model = _tiny_classifier()
    with torch.no_grad():
        a = model(**check).logits
        b = float_model(**check).logits
    assert float((a - b).abs().max()) > 10 * max(res.max_abs_diff, 1e-6)


def test_optimised_graph_runs_int8_kernels(exported):
    from compress.quant.export import INT8_MATMUL_OPS, float_matmuls_behind_qdq, optimized_op_counts

    _, path, changes, tmp = exported
    opt = tmp / "q.opt.onnx"
    counts = optimized_op_counts(path, opt)
    int8 = sum(counts.get(op, 0) for op in INT8_MATMUL_OPS)
    assert int8 >= 2 * 6 + 2, counts  # q, k, v, o, up, down of both layers, pooler and classifier
    assert float_matmuls_behind_qdq(opt) == []
    # the only float MatMuls left are attention's two activation x activation products per layer
    assert counts.get("MatMul", 0) + counts.get("FusedMatMul", 0) <= 2 * 2, counts
    # the 12 layer MatMuls had their weight transposed (the Gemm heads read it with transB); Q, K and V share an input
    assert changes["weight_transposes_folded"] == 2 * 6 and changes["activation_qdq_split"] == 2 * 2
    assert changes["gemm_biases_split"] == 2  # pooler and classifier: a float bias keeps ORT from making QGemm


def test_each_quantize_linear_has_one_consumer(exported):
    _, path, _, _ = exported
    graph = onnx.load(str(path)).graph
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    qs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2 * 6 + 2
    assert all(consumers[q.output[0]] == 1 for q in qs)
    acts = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {q.output[0] for q in qs}]
    assert all(consumers[d.output[0]] == 1 for d in acts)
    # activations are uint8 (U8S8), weights int8 initializers
    inits = {t.name: t for t in graph.initializer}
    assert all(inits[q.input[2]].data_type == onnx.TensorProto.UINT8 for q in qs)
    w_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(w_dq) == 2 * 6 + 2 and all(inits[d.input[0]].data_type == onnx.TensorProto.INT8 for d in w_dq)


def test_no_float_weight_left_and_file_about_4x_smaller(exported):
    from compress.onnx.export import export_onnx
    from compress.onnx.runtime import initializer_bytes, onnx_size_mb
    from compress.quant.export import float_weights

    _, path, _, tmp = exported
    assert float_weights(onnx.load(str(path))) == []
    fp32 = export_onnx(_tiny_classifier(), _inputs(2), tmp / "fp32.onnx", task="sequence-classification")
    # the weights (initializers) shrink ~4x; the whole file of this tiny model a little less (graph, scales, biases)
    weights = initializer_bytes(onnx.load(str(fp32))) / initializer_bytes(onnx.load(str(path)))
    assert 3.5 < weights < 4.05, weights
    assert onnx_size_mb(fp32) / onnx_size_mb(path) > 2.5


@pytest.mark.parametrize("bits,qmax", [(4, 7), (2, 1), (7, 63)])
def test_low_bit_weights_export_on_their_grid(tmp_path, bits, qmax):
    from onnx import numpy_helper

    from compress.onnx.parity import check_parity
    from compress.quant.export import export_qat_onnx
    from compress.quant.fake import QuantSpec

    model = _quantized(QuantSpec(weight_bits=bits))
    path = tmp_path / "q.onnx"
    export_qat_onnx(model, _inputs(2), path, task="sequence-classification")
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    w = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
         and inits[n.input[0]].ndim == 2]
    assert w and all(int(np.abs(a).max()) == qmax for a in w)
    if bits == 2:
        assert all(set(np.unique(a)) <= {-1, 0, 1} for a in w)
    _parity(model, path, _inputs(8, seed=5))


def test_reduce_range_keeps_activations_in_0_127():
    from compress.quant.fake import QuantSpec, act_quants

    model = _quantized(QuantSpec(reduce_range=True))
    qs = act_quants(model)
    assert qs and all(q.qmax == 127 and 0 <= int(q.zero_point) <= 127 for q in qs)
    assert all(m.qmax == 63 for n, m in model.named_modules() if type(m).__name__ == "QuantLinear")


def test_straight_through_gradient_and_lsq_scales_learn():
    from compress.quant.fake import QuantSpec, lsq_scales

    model = _quantized(QuantSpec(lsq=True))
    model.train()
    scales = lsq_scales(model)
    assert len(scales) == 2 * 6 + 2
    out = model(**_inputs(4, seed=7)).logits
    out.square().sum().backward()
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.linear.weight.grad is not None and float(q.linear.weight.grad.abs().sum()) > 0
    assert sum(float(s.grad.abs()) for s in scales if s.grad is not None) > 0


def test_lsq_model_exports_as_plain_qdq_with_parity(tmp_path):
    from compress.onnx.parity import check_parity
    from compress.quant.export import export_qat_onnx
    from compress.quant.fake import QuantSpec, lsq_scales

    model = _quantized(QuantSpec(lsq=True))
    with torch.no_grad():
        for s in lsq_scales(model):
            s.mul_(1.1)  # "learned": no longer the calibrated value
    path = tmp_path / "lsq.onnx"
    export_qat_onnx(model, _inputs(2), path, task="sequence-classification")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in ops and not any("learnable" in o.lower() for o in ops)
    _parity(model, path, _inputs(8, seed=5))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kw,field", [({"weight_bits": 3}, "weight_bits"), ({"weight_bits": 16}, "weight_bits"),
                                      ({"activation_bits": 4}, "activation_bits")])
def test_bits_the_export_cannot_hold(kw, field):
    from compress.quant.fake import QuantSpec

    with pytest.raises(InputError, match=f"qat.{field}"):
        QuantSpec(**kw).check()


def test_model_without_adapter_linears(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from compress.quant.fake import QuantSpec, insert_fake_quant

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(InputError, match="no nn.Linear projection"):
        insert_fake_quant(model, QuantSpec())
    with pytest.raises(InputError, match="no Linear layers"):
        insert_fake_quant(torch.nn.Sequential(torch.nn.Linear(2, 2)), QuantSpec())


def test_observers_without_calibration_batches():
    from compress.quant.fake import QuantSpec, calibrate, insert_fake_quant

    model = _tiny_classifier()
    insert_fake_quant(model, QuantSpec())
    with pytest.raises(InputError, match="calibration"):
        calibrate(model, [])


def test_ptq_refuses_a_qdq_graph_when_called_directly(exported, tmp_path):
    from compress.onnx.quantize import quantize_dynamic_int8, quantize_static_qdq

    _, path, _, _ = exported
    with pytest.raises(InputError, match="already quantized"):
        quantize_dynamic_int8(path, tmp_path / "d.onnx")
    with pytest.raises(InputError, match="already quantized"):
        quantize_static_qdq(path, tmp_path / "s.onnx", [{k: v.numpy() for k, v in _inputs(2).items()}])
    assert not (tmp_path / "d.onnx").exists() and not (tmp_path / "s.onnx").exists()


# ------------------------------------------------------------------------------------------------ the pass


QAT_PASS = {"type": "qat", "steps": 4, "batch_size": 8, "lr": 1e-4, "calibration_examples": 16}


def test_qat_pass_through_compress_run(tmp_path, tiny_bert_dir, data_dir):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir,
                      passes=[{"type": "export"}, QAT_PASS, {"type": "evaluate", "batch_size": 16}],
                      gates={"max_quality_drop": 1.0, "max_size_mb": 100})
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    rep = json.loads((out / "report.json").read_text())
    qat = next(p for p in rep["passes"] if p["type"] == "qat")
    m = qat["metrics"]
    assert m["steps"] == 4 and m["calibration_batches"] >= 1 and m["float_weights_left"] == 0
    assert m["parity_max_abs_diff"] <= 0.05 and m["parity_cosine"] >= 0.999
    assert set(m["term_curves"]) >= {"logit", "hidden", "attention", "attention_output"}
    # student and teacher are the same model here: the attention KL is quantization noise only; with the
    # model's dropout on (0.1 on the attention probabilities), the dropped zeros would make it > 1
    assert m["term_curves"]["attention"][0] < 0.3
    variants = rep["evaluation"]["variants"]
    assert {"fp32", "int8-qat", "int8"} <= set(variants) and variants["int8"]["alias_of"] == "int8-qat"
    assert variants["int8-qat"]["size_mb"] < variants["fp32"]["size_mb"] / 3
    assert (out / "student.int8.onnx").is_file()
    assert (out / "model" / "qat-scales.json").is_file()


def test_ptq_after_qat_is_refused(tmp_path, tiny_bert_dir, data_dir, capsys):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[QAT_PASS, {"type": "ptq"}])
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(ptq)" in err[0] and "quantized" in err[0]


@pytest.mark.parametrize("change,needle", [
    ({"weight_bits": 5}, "weight_bits"),
    ({"activation_bits": 16}, "activation_bits"),
])
def test_qat_config_bits_exit_2(tmp_path, tiny_bert_dir, data_dir, capsys, change, needle):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[dict(QAT_PASS, **change)])
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_qat_without_calibration_data_exit_2(tmp_path, tiny_bert_dir, data_dir, capsys):
    import yaml

    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[QAT_PASS])
    raw = yaml.safe_load(cfg.read_text())
    del raw["data"]["calibration"]
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.calibration" in err[0]


def test_reduce_range_auto_follows_the_cpu_flags():
    """Without VNNI (AVX2 only) ORT's u8s8 kernels saturate in int16 and 8-bit QAT loses parity: auto picks 7-bit
    weights there, 8-bit with VNNI or off x86; an explicit value is kept."""
    from compress.onnx.cpu import int8_saturates
    from compress.quant.fake import QuantSpec

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    vnni = "flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"
    assert int8_saturates.__wrapped__(avx2) is True and int8_saturates.__wrapped__(vnni) is False
    assert int8_saturates.__wrapped__("flags : avx2 avx_vnni") is False and int8_saturates.__wrapped__("no flags") is False
    assert QuantSpec().reduce_range is int8_saturates() and QuantSpec(reduce_range=False).reduce_range is False
    assert QuantSpec(reduce_range=True).act_qmax == 127 and QuantSpec(reduce_range=False).act_qmax == 255
