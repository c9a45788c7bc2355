"""The ONNX layer (compress/onnx): export, ORT sessions, parity, fusion, int8 quantization, latency, file I/O.

Real tiny random transformers models built from configs, real ONNX files, real ONNX Runtime sessions.
Each export is done once per module (fixtures) because the dynamo exporter takes a few seconds."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import transformers as tf

from compress.errors import InputError
from compress.onnx.export import accepted_inputs, export_onnx, op_counts, optimize_onnx
from compress.onnx.parity import check_parity, cosine_similarity
from compress.onnx.quantize import quantize_dynamic_int8, quantize_static_qdq, quantized_op_counts
from compress.onnx.runtime import (
    atomic_onnx_path,
    make_session,
    measure_latency,
    onnx_size_mb,
    run_session,
    save_model,
)
from compress.tasks import get_task

VOCAB = 100


def text_inputs(batch: int, seq: int, seed: int, *, pad: bool = True, token_types: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows (so masks really matter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        for row in range(1, batch, 2):
            mask[row, seq // 2 + row % 3 :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def as_numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def symbolic_dims(path: Path) -> dict[str, list[str | int]]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Jitter every parameter: fresh HF models have all-zero biases and all-one LayerNorm weights, which the
    exporter deduplicates into shared initializers, hiding what happens to a real (trained) model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-layer")


@pytest.fixture(scope="module")
def bert_cls(onnx_dir: Path) -> tuple[torch.nn.Module, Path]:
    """BERT classifier, hidden 128 (large enough that int8 weights visibly shrink the file)."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64, num_labels=3)
    model = trained_like(tf.BertForSequenceClassification(cfg)).eval()
    path = export_onnx(model, text_inputs(2, 16, seed=1), onnx_dir / "bert-cls.onnx", task="sequence-classification")
    return model, path


@pytest.fixture(scope="module")
def gpt2(onnx_dir: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    path = export_onnx(model, text_inputs(2, 12, seed=2, token_types=False), onnx_dir / "gpt2.onnx", task="causal-lm")
    return model, path


# ------------------------------------------------------------------------------------- export+parity
def test_bert_classifier_export_parity_and_dynamic_axes(bert_cls: tuple[torch.nn.Module, Path]) -> None:
    model, path = bert_cls
    dims = symbolic_dims(path)
    assert set(dims) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values()), dims  # batch, sequence symbolic
    sess = make_session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    # exported at batch 2 x seq 16; run at 5 x 23 with padding
    check = text_inputs(5, 23, seed=3)
    res = check_parity(model, path, check, task="sequence-classification", atol=1e-4, min_cosine=0.9999)
    assert res.ok, res
    assert res.output == "logits" and res.compared == 5 * 3
    assert res.max_abs_diff < 1e-4
    # and the ORT output really has the new shape
    assert run_session(sess, as_numpy(check))["logits"].shape == (5, 3)
    assert not model.training


def test_parity_detects_a_mismatch(bert_cls: tuple[torch.nn.Module, Path]) -> None:
    model, path = bert_cls
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.bert.encoder.layer[1].output.dense.weight.add_(0.05 * torch.randn_like(changed.bert.encoder.layer[1].output.dense.weight))
    res = check_parity(changed, path, text_inputs(4, 10, seed=4), task="sequence-classification")
    assert not res.ok
    assert res.max_abs_diff > 1e-3


def test_feature_extraction_bert_model(onnx_dir: Path) -> None:
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64)).eval()
    model.train()  # export must switch to eval (dropout off) and restore the mode afterwards
    path = export_onnx(model, text_inputs(2, 8, seed=5), onnx_dir / "bert-fe.onnx", task="feature-extraction")
    assert model.training
    sess = make_session(path)
    assert [o.name for o in sess.get_outputs()] == [get_task("feature-extraction").output]
    check = text_inputs(3, 13, seed=6)
    out = run_session(sess, as_numpy(check))["last_hidden_state"]
    assert out.shape == (3, 13, 32)
    res = check_parity(model, path, check, task="feature-extraction", atol=1e-4)
    assert res.ok, res
    assert res.compared == int(check["attention_mask"].sum()) * 32  # padding positions left out
    assert model.training  # parity ran in eval mode and restored training mode


def test_gpt2_causal_lm_has_only_logits(gpt2: tuple[torch.nn.Module, Path]) -> None:
    model, path = gpt2
    sess = make_session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]  # no present.* KV outputs
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "attention_mask"}
    check = text_inputs(3, 20, seed=7, token_types=False)
    assert run_session(sess, as_numpy(check))["logits"].shape == (3, 20, VOCAB)
    res = check_parity(model, path, check, task="causal-lm", atol=1e-4)
    assert res.ok, res


def test_qwen2_gqa_causal_lm(onnx_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    path = export_onnx(model, text_inputs(2, 10, seed=8, token_types=False), onnx_dir / "qwen2.onnx", task="causal-lm")
    check = text_inputs(4, 17, seed=9, token_types=False)
    res = check_parity(model, path, check, task="causal-lm", atol=1e-4)
    assert res.ok, res
    assert make_session(path).get_outputs()[0].name == "logits"


def test_vit_exported_at_batch_one_runs_at_batch_three(onnx_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=4)
    model = tf.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(10)
    path = export_onnx(model, {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}, onnx_dir / "vit.onnx",
                       task="image-classification")
    dims = symbolic_dims(path)["pixel_values"]
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]
    res = check_parity(model, path, {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}, task="image-classification", atol=1e-4)
    assert res.ok, res


def test_inputs_a_model_does_not_take_are_left_out() -> None:
    distil = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    assert accepted_inputs(distil, ["input_ids", "attention_mask", "token_type_ids"]) == ["input_ids", "attention_mask"]
    bert = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64))
    assert accepted_inputs(bert, ["input_ids", "token_type_ids"]) == ["input_ids", "token_type_ids"]

    class KwargsOnly(torch.nn.Module):
        def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
            return kwargs["input_ids"].float()

    assert accepted_inputs(KwargsOnly(), ["input_ids", "token_type_ids"]) == ["input_ids", "token_type_ids"]


def test_export_rejects_bad_task_and_inputs(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(InputError, match="model.task"):
        export_onnx(model, {"input_ids": torch.zeros(2, 4)}, tmp_path / "x.onnx", task="translation")
    with pytest.raises(InputError, match="inputs_embeds"):
        export_onnx(model, {"inputs_embeds": torch.zeros(2, 4)}, tmp_path / "x.onnx", task="feature-extraction")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- fusion
def test_optimize_bert_fuses_and_keeps_parity(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = bert_cls
    dst = tmp_path / "fused.onnx"
    assert optimize_onnx(path, dst, model_type="bert", num_heads=4, hidden_size=128)
    before, after = op_counts(path), op_counts(dst)
    assert sum(after.values()) < sum(before.values())
    assert after.get("SkipLayerNormalization", 0) >= 2 and "SkipLayerNormalization" not in before
    res = check_parity(model, dst, text_inputs(4, 19, seed=11), task="sequence-classification", atol=1e-4)
    assert res.ok, res
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx"]


def test_optimize_returns_false_and_writes_nothing(gpt2: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = gpt2
    assert not optimize_onnx(path, tmp_path / "a.onnx", model_type="no-such-type", num_heads=4, hidden_size=32)
    # ORT's gpt2 fusion does not match the dynamo exporter's graph: it either fails or fuses nothing
    assert not optimize_onnx(path, tmp_path / "b.onnx", model_type="gpt2", num_heads=4, hidden_size=32)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- int8 quant
def _fp32_and_int8_logits(fp32: Path, int8: Path, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    feed = as_numpy(text_inputs(n, 16, seed=12))
    return run_session(make_session(fp32), feed)["logits"], run_session(make_session(int8), feed)["logits"]


def test_dynamic_int8(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = bert_cls
    dst = quantize_dynamic_int8(path, tmp_path / "dyn.onnx")
    ops = quantized_op_counts(dst)
    assert ops.get("MatMulInteger", 0) >= 12 and ops.get("DynamicQuantizeLinear", 0) >= 1, ops
    assert onnx_size_mb(dst) < 0.6 * onnx_size_mb(path)
    ref, got = _fp32_and_int8_logits(path, dst)
    assert cosine_similarity(ref, got) > 0.99
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.onnx"]


def test_static_qdq_int8_leaves_no_temp_files(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = bert_cls
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    # calibration batches as a pipeline gives them: numpy, with an input the graph may not have, int32 ids
    calib = [{k: v.numpy().astype(np.int32) for k, v in text_inputs(8, 16, seed=20 + i).items()} for i in range(4)]
    dst = quantize_static_qdq(path, out / "static.onnx", calib, per_channel=True, method="minmax")
    ops = quantized_op_counts(dst)
    assert ops.get("QuantizeLinear", 0) >= 12 and ops.get("DequantizeLinear", 0) >= 12, ops
    assert onnx_size_mb(dst) < 0.6 * onnx_size_mb(path)
    ref, got = _fp32_and_int8_logits(path, dst)
    assert cosine_similarity(ref, got) > 0.98
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.75
    assert list(cwd.iterdir()) == []  # quant_pre_process ran in a temp folder
    assert sorted(p.name for p in out.iterdir()) == ["static.onnx"]
    assert Path.cwd() == cwd


def test_static_qdq_on_the_fused_model(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """The fused graph has ORT contrib ops (SkipLayerNormalization...) that plain ONNX shape inference cannot
    type: pre-processing uses ORT's symbolic shape inference so every MatMul/Gemm input gets calibrated;
    without it, the Gemm biases cannot be quantized and we fall back to float biases."""
    _, path = bert_cls
    fused = tmp_path / "fused.onnx"
    assert optimize_onnx(path, fused, model_type="bert", num_heads=4, hidden_size=128)
    calib = [as_numpy(text_inputs(8, 16, seed=40 + i)) for i in range(2)]
    feed = as_numpy(text_inputs(16, 16, seed=41))
    ref = run_session(make_session(path), feed)["logits"]
    counts = {}
    for pre in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="compress.onnx.quantize"):
            dst = quantize_static_qdq(fused, tmp_path / f"static-{pre}.onnx", calib, pre_process=pre)
        fell_back = any("float biases" in r.getMessage() for r in caplog.records)
        assert fell_back is (not pre)
        counts[pre] = quantized_op_counts(dst)["QuantizeLinear"]
        assert cosine_similarity(ref, run_session(make_session(dst), feed)["logits"]) > 0.98
    assert counts[True] > counts[False]  # symbolic shape inference lets more tensors be quantized


@pytest.mark.parametrize("activations,dtype", [("uint8", np.uint8), ("int8", np.int8)])
def test_static_qdq_activation_type(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path, activations: str,
                                    dtype: type) -> None:
    """Activations are quantized to the asked type (uint8 is ORT's fast U8S8 path on x86); weights stay int8."""
    _, path = bert_cls
    calib = [as_numpy(text_inputs(8, 16, seed=60 + i)) for i in range(2)]
    dst = quantize_static_qdq(path, tmp_path / f"{activations}.onnx", calib, activations=activations)
    model = onnx.load(str(dst))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    act_zero_points = {inits[n.input[2]].dtype for n in model.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2}
    assert act_zero_points == {np.dtype(dtype)}
    with pytest.raises(InputError, match="ptq.activations"):
        quantize_static_qdq(path, tmp_path / "bad.onnx", calib, activations="int4")


def _activation_scales(path: Path) -> dict[str, float]:
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1}


def test_entropy_calibration_clips_some_ranges(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """ORT's own entropy defaults degenerate to min-max; ours must really search for thresholds."""
    _, path = bert_cls
    calib = [as_numpy(text_inputs(8, 16, seed=30 + i)) for i in range(4)]
    minmax = _activation_scales(quantize_static_qdq(path, tmp_path / "minmax.onnx", calib, method="minmax"))
    entropy = _activation_scales(quantize_static_qdq(path, tmp_path / "entropy.onnx", calib, method="entropy"))
    assert minmax.keys() == entropy.keys() and len(minmax) >= 12
    # KL thresholds never widen the observed range, and here they do clip at least one tensor
    assert all(entropy[k] <= minmax[k] * (1 + 1e-5) for k in minmax)
    assert sum(entropy[k] < 0.99 * minmax[k] for k in minmax) >= 1


def test_static_qdq_rejects_bad_input(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = bert_cls
    with pytest.raises(InputError, match="calibration"):
        quantize_static_qdq(path, tmp_path / "s.onnx", [])
    with pytest.raises(InputError, match="kl-divergence"):
        quantize_static_qdq(path, tmp_path / "s.onnx", [as_numpy(text_inputs(2, 8, seed=1))], method="kl-divergence")
    assert not (tmp_path / "s.onnx").exists()


# ------------------------------------------------------------------------------------------- runtime
def test_measure_latency(bert_cls: tuple[torch.nn.Module, Path]) -> None:
    _, path = bert_cls
    feed = as_numpy(text_inputs(1, 16, seed=13, pad=False))
    stats = measure_latency(path, feed, threads=1, warmup=2, runs=15)
    assert stats["runs"] == 15
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"]
    assert stats["mean_ms"] > 0
    quick = measure_latency(path, feed, threads=1, warmup=0, runs=1000, max_seconds=0.0)
    assert quick["runs"] == 3  # stopped by the time budget, after the minimum of 3 timed runs


def test_sessions_feed_and_errors(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = bert_cls
    with pytest.raises(InputError, match="not found"):
        make_session(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="NoSuchExecutionProvider"):
        make_session(path, provider="NoSuchExecutionProvider")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InputError, match="broken.onnx"):
        make_session(broken)
    sess = make_session(path, threads=1)
    inputs = as_numpy(text_inputs(2, 9, seed=14))
    full = run_session(sess, inputs)["logits"]
    # int32 ids are cast to the declared int64; unknown extra inputs are dropped; token_type_ids filled with zeros
    lean = {"input_ids": inputs["input_ids"].astype(np.int32), "attention_mask": inputs["attention_mask"],
            "labels": np.zeros(2, dtype=np.int64)}
    np.testing.assert_allclose(run_session(sess, lean)["logits"], full, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="input_ids"):
        run_session(sess, {"attention_mask": inputs["attention_mask"]})


# ------------------------------------------------------------------------------------------ file I/O
def test_external_data_save_and_size(bert_cls: tuple[torch.nn.Module, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.onnx.runtime as rt

    _, path = bert_cls
    model = onnx.load(str(path))
    monkeypatch.setattr(rt, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the model were over 2 GB
    dst = save_model(model, tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and data.stat().st_size > 0.9 * path.stat().st_size
    assert dst.stat().st_size < 0.1 * data.stat().st_size
    expected = (dst.stat().st_size + data.stat().st_size) / 2**20
    assert onnx_size_mb(dst) == pytest.approx(expected)
    feed = as_numpy(text_inputs(2, 9, seed=15))
    np.testing.assert_allclose(run_session(make_session(dst), feed)["logits"],
                               run_session(make_session(path), feed)["logits"], atol=1e-6)
    # quantizing a model kept in external data works and gives one file again once it fits
    monkeypatch.setattr(rt, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    q = quantize_dynamic_int8(dst, tmp_path / "ext-int8.onnx")
    assert run_session(make_session(q), feed)["logits"].shape == (2, 3)
    # saving again as one file removes the now stale data file
    save_model(onnx.load(str(dst)), dst)
    assert not data.exists()
    assert onnx_size_mb(dst) == pytest.approx(dst.stat().st_size / 2**20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext-int8.onnx", "ext.onnx"]


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    dst = tmp_path / "model.onnx"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_onnx_path(dst) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# ------------------------------------------------------------------------------- other families
@pytest.mark.parametrize("family", ["roberta", "distilbert", "llama"])
def test_other_families_export_with_parity(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if family == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=66, pad_token_id=1))
        task, token_types = "sequence-classification", False
    elif family == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64))
        task, token_types = "sequence-classification", True  # a BERT tokenizer's extra input: left out
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64))
        task, token_types = "causal-lm", False
    model.eval()
    path = export_onnx(model, text_inputs(2, 12, seed=16, token_types=token_types), tmp_path / f"{family}.onnx", task=task)
    assert "token_type_ids" not in {i.name for i in make_session(path).get_inputs()}
    res = check_parity(model, path, text_inputs(3, 21, seed=17, token_types=token_types), task=task, atol=1e-4)
    assert res.ok, res
