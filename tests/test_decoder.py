"""KV-cache decoder export (compress.onnx.decoder) and the ORT generation loop (compress.generate) on tiny
random GPT-2, LLaMA and Qwen2 models: graph names and shapes, prefill and decode, greedy parity with
PyTorch `generate`, seeded sampling, and the bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.errors import InputError

VOCAB = 96


def tiny_decoder(family: str, seed: int = 0, **over):
    """A tiny random causal LM; a wide initialisation so greedy tokens vary (no one-token loops)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(**{"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
                            "initializer_range": 0.2, **over})
        return GPT2LMHeadModel(cfg).eval()
    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "initializer_range": 0.2, **over}
    return (LlamaForCausalLM(LlamaConfig(**kw)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def exported(request, tmp_path_factory):
    from compress.onnx.decoder import export_decoder

    model = tiny_decoder(request.param)
    path = tmp_path_factory.mktemp(f"dec-{request.param}") / "decoder.onnx"
    export_decoder(model, path)
    return request.param, model, path


def test_cache_names_and_shapes(exported):
    family, model, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    kv = 4 if family == "gpt2" else 2  # LLaMA / Qwen2 here use GQA: 2 kv heads for 4 query heads
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    for i in range(2):
        for k in ("key", "value"):
            assert ins[f"past_key_values.{i}.{k}"] == ["batch_size", kv, "past_sequence_length", 16]
            assert outs[f"present.{i}.{k}"] == ["batch_size", kv, "total_sequence_length", 16]
    assert list(outs)[0] == "logits" and outs["logits"] == ["batch_size", "sequence_length", VOCAB]
    assert len(ins) == 3 + 4 and len(outs) == 1 + 4


def test_prefill_and_decode_match_pytorch(exported):
    """Prefill (past 0) then a 1-token decode step against the PyTorch forward with a cache, batch 2."""
    from compress.generate import OnnxDecoder

    _, model, path = exported
    dec = OnnxDecoder(path)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    logits, past = dec.step(ids, dec.empty_past(2), 0)
    assert [p.shape[2] for p in past] == [6] * 4
    nxt = logits[:, -1].argmax(-1)[:, None]
    logits2, past2 = dec.step(nxt, past, 6)
    assert [p.shape[2] for p in past2] == [7] * 4
    with torch.no_grad():
        full = model(torch.from_numpy(np.concatenate([ids, nxt], 1))).logits.numpy()
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-4)
    np.testing.assert_allclose(logits2[:, 0], full[:, 6], atol=1e-4)


def test_greedy_parity_20_tokens(exported):
    from compress.onnx.decoder import generation_parity

    _, model, path = exported
    prompts = [[5, 17, 33, 2, 61], [70, 3, 3, 9, 14, 40, 22, 1, 8]]
    parity = generation_parity(model, path, prompts, new_tokens=20)
    assert parity.ok, (parity.reference, parity.onnx)
    assert all(len(t) == 20 for t in parity.onnx)
    assert all(len(set(t)) > 3 for t in parity.onnx)  # the models generate varied text, not one token over and over


def test_scoring_batch_runs_as_prefill(exported):
    """A plain scoring batch (input_ids, attention_mask) runs on the cache graph: empty past, positions filled."""
    from compress.onnx.runtime import make_session, run_session

    _, model, path = exported
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    out = run_session(make_session(path), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(next(iter(out.values())), ref, atol=1e-4)


def test_sampling_is_seeded(exported):
    from compress.generate import OnnxDecoder

    _, _, path = exported
    dec = OnnxDecoder(path)
    a = dec.generate([1, 2, 3], max_new_tokens=12, do_sample=True, temperature=1.5, seed=7, eos_token_id=None)
    b = dec.generate([1, 2, 3], max_new_tokens=12, do_sample=True, temperature=1.5, seed=7, eos_token_id=None)
    c = dec.generate([1, 2, 3], max_new_tokens=12, do_sample=True, temperature=1.5, seed=8, eos_token_id=None)
    greedy = dec.generate([1, 2, 3], max_new_tokens=12, eos_token_id=None)
    assert a == b and len(a) == 12
    assert a != c or a != greedy


def test_top_k_one_is_greedy():
    from compress.generate import pick

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50)
    assert all(pick(logits, do_sample=True, top_k=1, rng=rng) == int(logits.argmax()) for _ in range(20))
    assert all(pick(logits, do_sample=True, top_p=1e-6, rng=rng) == int(logits.argmax()) for _ in range(20))
    draws = {pick(logits, do_sample=True, top_k=3, rng=rng) for _ in range(200)}
    assert draws <= set(np.argsort(-logits)[:3].tolist()) and len(draws) > 1


def test_prompt_longer_than_positions(exported):
    from compress.generate import OnnxDecoder

    _, _, path = exported
    with pytest.raises(InputError, match="exceed the model's 64 positions"):
        OnnxDecoder(path).generate(list(range(60)), max_new_tokens=10)


def test_family_without_cache_support_is_bad_input(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from compress.onnx.decoder import export_decoder

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(InputError, match="family 'bert' has no KV-cache export; supported: gpt2, llama, qwen2"):
        export_decoder(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
