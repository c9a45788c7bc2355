"""int4 weight-only (compress.onnx.int4, MatMulNBits) and int8 dynamic on KV-cache decoders; models built from a
config file (compress.models.scratch)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from test_decoder import VOCAB, tiny_decoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    from compress.onnx.decoder import export_decoder

    model = tiny_decoder("llama", seed=3, initializer_range=0.02)  # trained-like scale: int4 error is small
    path = tmp_path_factory.mktemp("q-llama") / "decoder.onnx"
    export_decoder(model, path)
    return model, path


def _ops(path: Path) -> dict[str, int]:
    from compress.onnx.export import op_counts

    return op_counts(path)


def _cosine(a: Path, b: Path) -> float:
    """Cosine of two decoders' logits on a random scoring batch (random models' top-1 is too close to call)."""
    from compress.onnx.parity import cosine_similarity
    from compress.onnx.runtime import make_session, run_session

    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    la, lb = (next(iter(run_session(make_session(p), feed).values())) for p in (a, b))
    assert not np.array_equal(la, lb)  # the weights did change
    return cosine_similarity(la, lb)


def test_int4_has_matmulnbits_and_is_smallest(llama_onnx, tmp_path):
    from compress.onnx.int4 import quantize_int4
    from compress.onnx.quantize import quantize_dynamic_int8

    _, fp32 = llama_onnx
    int8, int4 = tmp_path / "int8.onnx", tmp_path / "int4.onnx"
    quantize_dynamic_int8(fp32, int8)
    counts = quantize_int4(fp32, int4, block_size=32, symmetric=True)
    ops = _ops(int4)
    # 2 layers x (q, k, v, o, gate, up, down) + the LM head
    assert counts["matmul_nbits"] == ops["MatMulNBits"] == 15
    assert ops.get("MatMul", 0) == 4  # what is left float: the two attention products per layer (no weights)
    sizes = [os.path.getsize(p) for p in (int4, int8, fp32)]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert _cosine(fp32, int4) > 0.95
    from compress.onnx.decoder import read_layout

    assert read_layout(int4) == read_layout(fp32)  # the cache metadata survives quantization


def test_int4_options_reach_the_graph(llama_onnx, tmp_path):
    """block size, asymmetric zero points, accuracy level, the LM head kept fp32, int4 embeddings."""
    from compress.onnx.int4 import quantize_int4

    _, fp32 = llama_onnx
    dst = tmp_path / "asym.onnx"
    counts = quantize_int4(fp32, dst, block_size=16, symmetric=False, accuracy_level=4, lm_head_precision="fp32",
                           embeddings="int4")
    model = onnx.load(str(dst))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == counts["matmul_nbits"] == 14  # the LM head left out
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["block_size"] == 16 and attrs["bits"] == 4 and attrs["accuracy_level"] == 4
    assert all(len(n.input) >= 4 and n.input[3] for n in nbits)  # asymmetric: a zero-point input
    inits = {t.name: t for t in model.graph.initializer}
    float_heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                   and inits[n.input[1]].dims[-1] == VOCAB]
    assert len(float_heads) == 1
    assert counts["int4_embeddings"] == 1 and _ops(dst)["GatherBlockQuantized"] == 1
    assert _cosine(fp32, dst) > 0.95


def test_gpt2_gemm_and_tied_head_become_matmulnbits(tmp_path):
    """GPT-2's Conv1D exports as Gemm and its tied LM head reads the embedding through a Transpose: both are
    rewritten so that MatMulNBits takes them."""
    from compress.generate import OnnxDecoder
    from compress.onnx.decoder import export_decoder
    from compress.onnx.int4 import quantize_int4

    model = tiny_decoder("gpt2", seed=4, initializer_range=0.02)
    fp32, int4 = tmp_path / "gpt2.onnx", tmp_path / "gpt2.int4.onnx"
    export_decoder(model, fp32)
    assert "Gemm" in _ops(fp32)
    counts = quantize_int4(fp32, int4, block_size=32)
    ops = _ops(int4)
    assert "Gemm" not in ops and counts["matmul_nbits"] == 2 * 4 + 1
    assert os.path.getsize(int4) < os.path.getsize(fp32) / 2
    assert _cosine(fp32, int4) > 0.95
    assert len(OnnxDecoder(int4).generate([1, 2, 3], max_new_tokens=8, eos_token_id=None)) == 8


@pytest.mark.parametrize("block, msg", [(128, "128 does not divide the input dimension 64 of MatMul"),
                                        (48, "48 is not a power of two >= 16")])
def test_bad_block_size(llama_onnx, tmp_path, block, msg):
    from compress.onnx.int4 import quantize_int4

    _, fp32 = llama_onnx
    with pytest.raises(InputError, match=f"ptq.int4.block_size: {msg}"):
        quantize_int4(fp32, tmp_path / "bad.onnx", block_size=block)
    assert not (tmp_path / "bad.onnx").exists()


def test_int4_refuses_a_quantized_graph(llama_onnx, tmp_path):
    from compress.onnx.int4 import quantize_int4

    _, fp32 = llama_onnx
    quantize_int4(fp32, tmp_path / "a.onnx")
    with pytest.raises(InputError):
        quantize_int4(tmp_path / "a.onnx", tmp_path / "b.onnx")


def test_model_from_config_file(tmp_path):
    from compress.models.loading import resolve_source
    from compress.models.scratch import build_from_config

    spec = tmp_path / "m.yaml"
    spec.write_text("model_type: llama\nhidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\n"
                    "num_attention_heads: 2\nnum_key_value_heads: 1\nmax_position_embeddings: 32\n")
    kind, source = resolve_source("config:m.yaml", tmp_path)
    assert kind == "config"
    model, tok = build_from_config(Path(source), "causal-lm", str(REPO / "configs/tiny-llama-tokenizer"), tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) == 4096
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert model.config.num_key_value_heads == 1
    spec.write_text("hidden_size: 32\n")
    with pytest.raises(InputError, match="model_type"):
        build_from_config(spec, "causal-lm", str(REPO / "configs/tiny-llama-tokenizer"), tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        resolve_source("config:missing.yaml", tmp_path)
