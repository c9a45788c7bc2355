"""Edge targets (compress/onnx/edge.py, docs/edge.md): tiny random BERT and ViT through export, static int8 and
evaluate with `target.edge`; the graphs are checked with ONNX itself, the .ort files in a fresh ORT session, the
usability numbers against ORT's own analysis of the written files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from compress.cli import main
from compress.onnx import edge
from tests.conftest import make_config, one_line_error, save_tiny_bert, sentiment_files

EDGE_PASSES = [{"type": "export"}, {"type": "ptq", "methods": ["static"], "primary": "static"},
               {"type": "evaluate", "batch_size": 8}]


def _graph_ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _static_inputs(path: Path) -> dict[str, list[int]]:
    shapes = edge.input_shapes(path)
    assert all(isinstance(d, int) and d > 0 for s in shapes.values() for d in s), shapes
    return shapes  # type: ignore[return-value]


def _check_ort_files(out: Path, variant: str, feed: dict[str, np.ndarray]) -> None:
    """The .ort file next to the .onnx loads in a fresh session and gives its outputs; the operator config lists
    every op of the graph."""
    import onnxruntime as ort

    onnx_file = out / f"student.{variant}.onnx" if variant != "fp32" else out / "student.onnx"
    stem = onnx_file.name[: -len(".onnx")]
    ort_file, cfg = out / f"{stem}.ort", out / f"{stem}.required_operators.config"
    assert ort_file.is_file() and cfg.is_file()
    a = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.load_model_format", "ORT")
    b = ort.InferenceSession(str(ort_file), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    listed = {op for line in cfg.read_text().splitlines() if line and not line.startswith("#")
              for op in line.split(";")[2].split(",")}
    assert _graph_ops(onnx_file) <= listed


def test_edge_bert_pipeline(tmp_path):
    model = save_tiny_bert(tmp_path / "bert", layers=2, seed=0, initializer_range=0.5, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    data = sentiment_files(tmp_path / "data", eval=20)
    cfg = make_config(tmp_path, model, data, passes=EDGE_PASSES,
                      target={"batch_size": 1, "seq_len": 32, "threads": 1, "warmup": 1, "runs": 3,
                              "edge": {"eps": ["NNAPI", "CoreMLExecutionProvider"], "batch_size": 2, "seq_len": 24}},
                      gates={"min_ep_coverage": {"nnapi": 0.95, "coreml": 0.95}, "max_ep_partitions": {"nnapi": 3}})
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    rep = json.loads((out / "report.json").read_text())
    # static shapes from target.edge, on both files
    assert rep["shipped"] == "student.int8.onnx" and rep["final_student"]["model"] == "int8-static"
    for f in ("student.onnx", "student.int8.onnx"):  # the shipped int8-static file, written once
        assert _static_inputs(out / f) == {"input_ids": [2, 24], "attention_mask": [2, 24], "token_type_ids": [2, 24]}
        ops = _graph_ops(out / f)
        assert not ops & set(edge.MASK_OPS), ops  # the additive mask path
        assert not ops & {"LayerNormalization", "Erf", "SkipLayerNormalization", "BiasGelu", "Attention",
                          "DynamicQuantizeLinear", "MatMulInteger"}, ops
        assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out / f)).graph.node)  # no contrib ops
    assert {"QuantizeLinear", "DequantizeLinear"} <= _graph_ops(out / "student.int8.onnx")
    # weight MatMuls / Gemms in int8, the attention products of two activations left in float
    g = onnx.load(str(out / "student.int8.onnx")).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    float_mm = [n for n in g.node if n.op_type == "MatMul" and not any(made_by.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(float_mm) == 4  # QK^T and PV in each of the 2 layers
    assert sum(n.op_type in ("MatMul", "Gemm") for n in g.node) > len(float_mm)
    export = rep["passes"][0]["metrics"]
    assert export["parity_max_abs_diff"] < 1e-3 and export["ort_max_abs_diff"] < 1e-5
    assert export["mask_ops_left"] == [] and export["edge_shape"] == [2, 24]
    # the .ort files load and give the .onnx outputs; their operator configs cover the graphs
    feed = {"input_ids": np.full((2, 24), 7, np.int64), "attention_mask": np.ones((2, 24), np.int64),
            "token_type_ids": np.zeros((2, 24), np.int64)}
    feed["attention_mask"][1, 10:] = 0
    for variant in ("fp32", "int8"):
        _check_ort_files(out, variant, feed)
    # the usability numbers in the report are ORT's analysis of the shipped files
    variants = rep["evaluation"]["variants"]
    for variant, f in (("fp32", "student.onnx"), ("int8-static", "student.int8.onnx")):
        assert variants[variant]["mobile"] == json.loads(json.dumps(edge.mobile_usability(out / f)))
        o = variants[variant]["ort_format"]
        assert o["max_abs_diff_to_onnx"] < 1e-4 and o["quality"] == variants[variant]["quality"]
    nnapi, coreml = variants["int8-static"]["mobile"]["nnapi"], variants["fp32"]["mobile"]["coreml"]
    assert nnapi["coverage"] == 1.0 and nnapi["partitions"] == 1 and nnapi["unsupported_for_dynamic_shape"] == 0
    assert coreml["coverage"] >= 0.95 and coreml["partitions"] <= 3
    # CoreML's EP takes no QDQ: the int8 file's CoreML numbers say so, which is why its gates read the fp32 file
    assert "ai.onnx:QuantizeLinear" in variants["int8-static"]["mobile"]["coreml"]["unsupported_ops"]
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["min_ep_coverage.nnapi"]["variant"] == "int8-static" and gates["min_ep_coverage.nnapi"]["value"] == 1.0
    assert gates["min_ep_coverage.coreml"]["variant"] == "fp32" and gates["min_ep_coverage.coreml"]["passed"]
    assert gates["max_ep_partitions.nnapi"]["value"] == 1
    # the edge eval pads each batch to the fixed shape: quality of the fp32 edge file equals the PyTorch model's
    assert variants["fp32"]["fidelity"] == 1.0
    # a coverage gate over what was measured fails the run (from the cache: exit 3)
    assert main(["run", str(cfg), "-q", "--set", "gates.min_ep_coverage={coreml-neuralnetwork: 0.999}"]) == 3
    failed = json.loads((out / "report.json").read_text())["gates"]
    assert [g["name"] for g in failed if not g["passed"]] == ["min_ep_coverage.coreml-neuralnetwork"]


def test_edge_qat_exports_a_fixed_shape_qdq_graph_and_its_ort_file(tmp_path):
    """qat on an edge target: the int8 file is the edge graph (static shapes, the additive mask, no LayerNorm /
    contrib ops) with int8 weight initializers behind DequantizeLinear, ORT int8 within atol of the fake-quant
    model, a .ort file that matches it, and NNAPI usability measured on it."""
    model = save_tiny_bert(tmp_path / "bert", layers=2, seed=0, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    data = sentiment_files(tmp_path / "data", eval=20)
    passes = [{"type": "export"}, {"type": "qat", "steps": 2, "batch_size": 8, "calibration_examples": 16},
              {"type": "evaluate", "batch_size": 8}]
    cfg = make_config(tmp_path, model, data, passes=passes,
                      target={"batch_size": 1, "seq_len": 32, "threads": 1, "warmup": 1, "runs": 3,
                              "edge": {"eps": ["nnapi"], "batch_size": 2, "seq_len": 24}},
                      gates={"min_ep_coverage": {"nnapi": 0.95}})
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    f = out / "student.int8.onnx"  # the shipped int8-qat file
    assert _static_inputs(f) == {"input_ids": [2, 24], "attention_mask": [2, 24], "token_type_ids": [2, 24]}
    ops = _graph_ops(f)
    assert not ops & set(edge.MASK_OPS) and not ops & {"LayerNormalization", "Erf", "SkipLayerNormalization"}, ops
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    g = onnx.load(str(f)).graph
    assert all(n.domain in ("", "ai.onnx") for n in g.node)
    int8_weights = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 2 * 6  # q, k, v, o, up, down of each layer
    rep = json.loads((out / "report.json").read_text())
    qat = rep["passes"][1]["metrics"]
    assert qat["parity_max_abs_diff"] < 0.05 and qat["ort_max_abs_diff"] < 1e-3 and qat["fused"] is False
    feed = {"input_ids": np.full((2, 24), 7, np.int64), "attention_mask": np.ones((2, 24), np.int64),
            "token_type_ids": np.zeros((2, 24), np.int64)}
    _check_ort_files(out, "int8", feed)
    nnapi = rep["evaluation"]["variants"]["int8-qat"]["mobile"]["nnapi"]
    assert nnapi["coverage"] == 1.0 and nnapi["partitions"] == 1


def test_edge_vit_export_and_ort(tmp_path, tiny_vit_dir):
    """ViT through export_edge: fixed batch, image side from the model, Slice instead of the CLS Gather, no
    LayerNormalization / Erf; parity with PyTorch (tanh GELU) and the .ort file with the .onnx."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification.from_pretrained(tiny_vit_dir, num_labels=5).eval()
    pixels = torch.randn(3, 3, 16, 16)
    path = tmp_path / "vit.onnx"
    edge.export_edge(model, {"pixel_values": pixels}, path, task="image-classification", batch=1, seq=None)
    assert _static_inputs(path) == {"pixel_values": [1, 3, 16, 16]}
    ops = _graph_ops(path)
    assert not ops & {"LayerNormalization", "Erf", "Gather", *edge.MASK_OPS}, ops
    assert {"Slice", "Squeeze", "ReduceMean", "Tanh"} <= ops
    with edge.edge_forward(model) as em, torch.no_grad():
        ref = em(pixel_values=pixels).logits.numpy()
    from compress.onnx.runtime import make_session

    got = edge.run_fixed(make_session(path), {"pixel_values": pixels})["logits"]
    assert got.shape == (3, 5) and np.abs(got - ref).max() < 1e-4
    edge.write_ort(path)
    ort_out = edge.run_fixed(edge.load_ort_session(edge.ort_path(path)), {"pixel_values": pixels})["logits"]
    assert np.abs(ort_out - got).max() < 1e-6
    usable = edge.mobile_usability(path)
    assert usable["nnapi"]["coverage"] == 1.0 and usable["nnapi"]["partitions"] == 1
    assert usable["coreml"]["coverage"] == 1.0
    # the model is left as it was (exact GELU, its own attention)
    assert not any(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in model.modules())


def test_layernorm_rewrite_matches_onnx_layernorm(tmp_path):
    """simplify_for_mobile's spelled-out LayerNorm and Slice+Squeeze compute what the ops they replace compute."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-3),
         helper.make_node("Gather", ["y", "i"], ["z"], axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.array(3, np.int64), "i")])
    path = tmp_path / "ln.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    import onnxruntime as ort

    x = (rng.standard_normal((2, 5, 8)) * 3 + 1).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert edge.simplify_for_mobile(path) == {"LayerNormalization": 1, "Gather": 1}
    assert not _graph_ops(path) & {"LayerNormalization", "Gather"}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the rewritten ops, not a re-fusion
    after = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = ((x - mu) / np.sqrt(var + 1e-3) * scale + bias)[:, 3]
    assert np.abs(after - before).max() < 1e-5 and np.abs(after - expected).max() < 1e-5


@pytest.mark.parametrize("target_edge, gates, passes, field", [
    ({"eps": ["nnapi"], "seq_len": "dynamic"}, {}, None, "target.edge.seq_len"),
    ({"eps": ["nnapi"], "batch_size": 0}, {}, None, "target.edge.batch_size"),
    ({"eps": ["npu"]}, {}, None, "target.edge.eps[0]: 'npu' is not an execution provider ONNX Runtime knows"),
    ({"eps": ["CUDA"]}, {}, None, "target.edge.eps[0]: 'CUDA' (CUDAExecutionProvider) has no mobile usability"),
    ({"eps": ["nnapi"]}, {"min_ep_coverage": {"hexagon": 0.9}}, None, "gates.min_ep_coverage.hexagon"),
    (None, {"min_ep_coverage": {"nnapi": 0.9}}, None, "gates.min_ep_coverage: only an edge run"),
    ({"eps": ["nnapi"]}, {}, [{"type": "export"}, {"type": "ptq"}, {"type": "evaluate"}],
     "passes[1] (ptq): methods: dynamic int8"),
    ({"eps": ["nnapi"]}, {}, [{"type": "export"}, {"type": "qat", "steps": 1, "quantize_qk": True},
                              {"type": "evaluate"}], "passes[1] (qat): quantize_qk / quantize_attention_probs"),
])
def test_edge_bad_input(tmp_path, tiny_bert_dir, data_dir, capsys, target_edge, gates, passes, field):
    target = {"batch_size": 1, "seq_len": 32, **({"edge": target_edge} if target_edge else {})}
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes or EDGE_PASSES, target=target, gates=gates)
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(str(cfg)) or "model.yaml" in line
    assert field in line, line
    assert not (tmp_path / "out" / "student.onnx").exists()  # nothing ran


def test_server_export_keeps_dynamic_axes(tmp_path, tiny_bert_dir, data_dir):
    """Without target.edge nothing changes: dynamic axes, no .ort file."""
    from compress.config import load_config

    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "export", "optimize": False}])
    assert main(["run", str(cfg), "-q"]) == 0
    shapes = edge.input_shapes(tmp_path / "out" / "student.onnx")
    assert all(isinstance(s[0], str) and isinstance(s[1], str) for s in shapes.values()), shapes
    assert not (tmp_path / "out" / "student.ort").exists()
    run = load_config(cfg)
    assert run.target.edge is None and edge.profile(run) is None
    raw = yaml.safe_load(cfg.read_text())
    raw["target"]["edge"] = {"eps": ["nnapi"]}
    cfg.write_text(yaml.safe_dump(raw))
    assert edge.profile(load_config(cfg)) == (["nnapi"], 1, 32)  # the shapes default to the target's
