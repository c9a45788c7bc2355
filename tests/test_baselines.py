"""compress.onnx.baselines: the teacher in ONNX Runtime (fused fp32, dynamic int8, static QDQ int8) on a tiny random
BERT classifier, and the interleaved latency rounds the evaluate pass times teacher and students with."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import InputError
from compress.onnx.baselines import TeacherModel, teacher_baselines, why_not
from compress.onnx.export import op_counts
from compress.onnx.runtime import make_session, measure_latency_rounds, run_session


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-cls")
    BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64, num_labels=3)
                                  ).save_pretrained(folder)
    return folder


def _batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 200, size=(4, 12), dtype=np.int64),
             "attention_mask": np.ones((4, 12), dtype=np.int64)} for _ in range(n)]


def test_teacher_baselines_fp32_dynamic_static(tiny_classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    made = teacher_baselines(tiny_classifier, "sequence-classification", tmp_path, methods=("fp32", "dynamic", "static"),
                             calibration=_batches(3))
    assert [m.name for m in made] == ["fp32", "int8-dynamic", "int8-static"]
    assert all(isinstance(m, TeacherModel) and Path(m.path).is_file() and Path(m.path).parent == tmp_path for m in made)
    fp32, dyn, static = made
    # BERT is fusable: the fp32 graph is ORT's optimized one, and both int8 files start from it
    assert all(m.fused for m in made)
    assert fp32.label == "teacher fp32 (ORT, fused)" and dyn.label == "teacher int8-dynamic (ORT)"
    ops = op_counts(fp32.path)
    assert ops.get("SkipLayerNormalization", 0) > 0
    assert op_counts(dyn.path).get("MatMulInteger", 0) > 0
    static_ops = op_counts(static.path)
    assert static_ops.get("QuantizeLinear", 0) > 0 and static_ops.get("SkipLayerNormalization", 0) > 0
    assert not (tmp_path / "teacher.raw.onnx").exists()
    # every file computes the teacher's logits
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    batch = _batches(1, seed=5)[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    got = next(iter(run_session(make_session(fp32.path), batch).values()))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    for m in (dyn, static):
        q = next(iter(run_session(make_session(m.path), batch).values()))
        assert q.shape == ref.shape and np.isfinite(q).all() and np.abs(q - ref).max() < 0.5


def test_teacher_baselines_default_and_unfused(tiny_classifier: Path, tmp_path: Path) -> None:
    made = teacher_baselines(tiny_classifier, "sequence-classification", tmp_path, optimize=False)
    assert [m.name for m in made] == ["fp32", "int8-dynamic"]  # the default: what evaluate measures
    assert not made[0].fused and made[0].label == "teacher fp32 (ORT)"
    assert op_counts(made[0].path).get("SkipLayerNormalization", 0) == 0


def test_teacher_baselines_bad_input(tiny_classifier: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="calibration"):
        teacher_baselines(tiny_classifier, "sequence-classification", tmp_path, methods=("fp32", "static"))
    with pytest.raises(InputError, match="methods"):
        teacher_baselines(tiny_classifier, "sequence-classification", tmp_path, methods=("fp16",))
    assert not list(tmp_path.glob("*.onnx"))


def test_why_not() -> None:
    assert why_not("sequence-classification") is None and why_not("feature-extraction") is None
    assert "causal-lm" in why_not("causal-lm")
    assert "edge" in why_not("sequence-classification", edge=True)


def test_measure_latency_rounds(tiny_classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from compress.onnx import runtime

    fp32, dyn = teacher_baselines(tiny_classifier, "sequence-classification", tmp_path)
    feed = _batches(1)[0]
    # one session alive at a time: idle sessions side by side slowed the timed one on a 2-core host (2.7x vs 8.2x)
    alive: set[int] = set()
    most = [0]
    real = runtime.make_session

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        sess = real(*args, **kwargs)
        alive.add(id(sess))
        most[0] = max(most[0], len(alive))
        weakref.finalize(sess, alive.discard, id(sess))
        return sess

    monkeypatch.setattr(runtime, "make_session", counting)
    lat = measure_latency_rounds({"a": fp32.path, "b": dyn.path}, {"a": feed, "b": feed}, threads=1, warmup=1,
                                 runs=6, rounds=3, reference="a")
    assert most[0] == 1
    assert set(lat) == {"a", "b"}
    assert lat["a"]["speedup"] == 1.0  # the reference against itself, round by round
    for s in lat.values():
        assert s["runs"] == 6 and s["rounds"] == 3 and 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"]
        assert s["speedup"] > 0
    with pytest.raises(ValueError, match="reference"):
        measure_latency_rounds({"a": fp32.path}, {"a": feed}, reference="z")
