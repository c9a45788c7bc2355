"""Sentence-embedding students (compress.embed): the sentence-transformers folder format, pooling and projection
in PyTorch vs the exported ONNX graph (padded batches included), the embedding losses and retrieval metrics,
bad input, and a tiny end-to-end distill -> export -> ptq -> evaluate run. Tiny random BERTs, real ORT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import minilm_path, one_line_error, save_tiny_bert, sentiment_rows, write_jsonl

from compress.cli import main
from compress.distill import losses
from compress.embed import OUTPUT, SentenceEncoder, SentenceHead, SentenceSpec, read_spec, write_st_files
from compress.embed.hooks import distill_heads
from compress.embed.metrics import embedding_scores, knn_accuracy, pairwise_spearman, recall_at_k
from compress.embed.model import pool
from compress.errors import InputError
from compress.onnx.export import export_onnx
from compress.onnx.parity import check_parity
from compress.onnx.runtime import make_session, run_session

TEXTS = ["a short one", "a much longer sentence with many more words than the first one has", "mid length text here"]


@pytest.fixture(scope="module")
def st_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_bert(tmp_path_factory.mktemp("st-bert"), layers=2, seed=3)
    write_st_files(folder, SentenceSpec("mean", True, 32, max_seq_length=64))
    return folder


def _padded(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < enc["attention_mask"].shape[1]  # a padded row
    return dict(enc)


def _encoder(folder: Path, mode: str, dense: torch.nn.Linear | None = None, normalize: bool = True) -> SentenceEncoder:
    from transformers import AutoModel

    return SentenceEncoder(AutoModel.from_pretrained(folder), SentenceHead(SentenceSpec(mode, normalize, 32), dense)).eval()


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_pytorch_onnx_parity_padded(tmp_path, st_bert, mode):
    enc = _encoder(st_bert, mode)
    inputs = _padded(st_bert)
    path = export_onnx(enc, inputs, tmp_path / "s.onnx", task="feature-extraction", output_name=OUTPUT)
    sess = make_session(path)
    assert [o.name for o in sess.get_outputs()] == [OUTPUT]
    res = check_parity(enc, path, inputs, task="feature-extraction", atol=1e-4, min_cosine=0.99999)
    assert res.ok and res.output == OUTPUT, res
    got = run_session(sess, {k: v.numpy() for k, v in inputs.items()})[OUTPUT]
    assert got.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised inside the graph
    # padding does not change a row: the short text alone (no padding) gives the same vector in ONNX
    n = int(inputs["attention_mask"][0].sum())
    alone = run_session(sess, {k: v[:1, :n].numpy() for k, v in inputs.items()})[OUTPUT]
    np.testing.assert_allclose(alone[0], got[0], atol=1e-5)


def test_pool_ignores_padding_values():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h2 = h.clone()
    h2[0, 3:] = 1e4  # whatever the padded positions hold
    for mode in ("mean", "max", "cls"):
        torch.testing.assert_close(pool(h, mask, mode)[0], pool(h2, mask, mode)[0])
    torch.testing.assert_close(pool(h, mask, "mean")[0], h[0, :3].mean(0))
    torch.testing.assert_close(pool(h, mask, "max")[0], h[0, :3].amax(0))


def test_read_real_minilm_folder():
    spec = read_spec(minilm_path())
    assert (spec.pooling, spec.normalize, spec.dim, spec.dense_out, spec.max_seq_length) == ("mean", True, 384, None, 256)


def test_st_folder_written_and_read_back(tmp_path):
    folder = save_tiny_bert(tmp_path / "m", layers=1, seed=1)
    dense = torch.nn.Linear(32, 48)
    write_st_files(folder, SentenceSpec("cls", True, 32, max_seq_length=128), dense)
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert all((folder / m["path"]).is_dir() for m in modules)
    pcfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pcfg["pooling_mode_cls_token"] and not pcfg["pooling_mode_mean_tokens"] and pcfg["word_embedding_dimension"] == 32
    spec = read_spec(folder)
    assert (spec.pooling, spec.normalize, spec.dense_in, spec.dense_out, spec.out_dim) == ("cls", True, 32, 48, 48)
    from transformers import AutoModel

    enc = SentenceEncoder.from_folder(AutoModel.from_pretrained(folder), folder)
    torch.testing.assert_close(enc.head.dense.weight, dense.weight)
    torch.testing.assert_close(enc.head.dense.bias, dense.bias)
    # without a projection and without normalisation: no Dense, no Normalize
    write_st_files(tmp_path / "plain", SentenceSpec("max", False, 32))
    assert [m["path"] for m in json.loads((tmp_path / "plain" / "modules.json").read_text())] == ["", "1_Pooling"]


def test_projection_made_for_a_narrower_student_and_exported(tmp_path, st_bert):
    """A 24-wide student of the 32-wide teacher learns a Linear 24 -> 32; it is part of the ONNX graph."""
    from transformers import AutoModel

    sdir = save_tiny_bert(tmp_path / "narrow", layers=1, seed=4, hidden_size=24, intermediate_size=48)
    run = type("R", (), {"model": type("M", (), {"pooling": None, "task": "feature-extraction"})()})()
    student = AutoModel.from_pretrained(sdir)
    heads = distill_heads(student, st_bert, run)
    dense = heads.student.dense
    assert isinstance(dense, torch.nn.Linear) and (dense.in_features, dense.out_features) == (24, 32)
    assert heads.teacher.dense is None and not any(p.requires_grad for p in heads.teacher.parameters())
    with torch.no_grad():
        dense.weight.normal_()
    enc = SentenceEncoder(student, heads.student).eval()
    inputs = _padded(st_bert)
    path = export_onnx(enc, inputs, tmp_path / "p.onnx", task="feature-extraction", output_name=OUTPUT)
    got = run_session(make_session(path), {k: v.numpy() for k, v in inputs.items()})[OUTPUT]
    assert got.shape == (3, 32)
    with torch.no_grad():
        np.testing.assert_allclose(got, enc(**inputs).numpy(), atol=1e-5)
    inits = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    w = dense.weight.detach().numpy()
    assert any(a.shape in (w.shape, w.T.shape) and np.allclose(a.reshape(-1), (w if a.shape == w.shape else w.T).reshape(-1))
               for a in inits)


def test_embedding_losses():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    s = torch.nn.functional.normalize(t + 0.3 * torch.randn(8, 16), dim=-1)
    cos = torch.nn.functional.cosine_similarity(s, t).mean()
    torch.testing.assert_close(losses.embedding_mse(s, t), 2 - 2 * cos)  # unit vectors: 2 - 2 cos
    torch.testing.assert_close(losses.embedding_cosine(s, t), 1 - cos)
    aligned = losses.in_batch_contrastive(s, t)
    shuffled = losses.in_batch_contrastive(s[torch.randperm(8, generator=torch.Generator().manual_seed(1))], t)
    assert float(aligned) < float(shuffled)
    assert float(losses.in_batch_contrastive(t, t, temperature=0.01)) < 1e-3
    with pytest.raises(InputError, match="temperature"):
        losses.in_batch_contrastive(s, t, temperature=0.0)


def test_retrieval_metrics():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((60, 16))
    same = embedding_scores(t, t * 3.0)  # scale does not matter
    assert same["fidelity"] == pytest.approx(1.0) and same["recall_at_10"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    noisy = t + 0.5 * rng.standard_normal(t.shape)
    r = embedding_scores(noisy, t)
    assert 0.3 < r["recall_at_10"] < 1.0 and 0.5 < r["spearman"] < 1.0 and r["retrieval_agreement"] == r["recall_at_10"]
    assert recall_at_k(rng.standard_normal((60, 16)), t) < 0.4  # unrelated embeddings: near chance (10/59)
    # k-NN: two clusters with labels are told apart; labels at random are not
    centers = np.repeat(np.eye(16)[:2] * 5, 30, axis=0)
    labels = ["a"] * 30 + ["b"] * 30
    assert knn_accuracy(centers + rng.standard_normal((60, 16)), labels) > 0.9
    assert knn_accuracy(rng.standard_normal((60, 16)), labels) < 0.8
    assert knn_accuracy(t, ["x"] * 60) is None  # one class: nothing to classify
    assert pairwise_spearman(t[:2], t[:2]) == 1.0


# ---------------------------------------------------------------------------------------------- bad input
def test_pooling_mode_the_folder_does_not_define(tmp_path, st_bert):
    with pytest.raises(InputError, match=r"model.pooling: 'cls' is not a pooling mode .*1_Pooling/config.json defines \(it defines: mean\)"):
        read_spec(st_bert, "cls")
    weird = tmp_path / "weird"
    (weird / "1_Pooling").mkdir(parents=True)
    (weird / "modules.json").write_text((st_bert / "modules.json").read_text())
    (weird / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                 "pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(InputError, match="pooling pooling_mode_weightedmean_tokens is not one of mean, cls, max"):
        read_spec(weird)


def _embed_cfg(tmp_path: Path, model: Path, n_eval: int, passes: list[dict], **extra) -> Path:
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(n_eval, seed=2))
    cfg = {"name": "emb", "model": {"path": str(model), "task": "feature-extraction", "max_length": 16},
           "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"},
                    "calibration": {"path": "eval.jsonl"}},
           "passes": passes, "target": {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3},
           "output": str(tmp_path / "out"), **extra}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_bad_pooling_and_small_retrieval_gate_exit_2(tmp_path, st_bert, capsys):
    path = _embed_cfg(tmp_path, st_bert, 40, [{"type": "export"}, {"type": "evaluate"}])
    assert main(["run", str(path), "-q", "--set", "model.pooling=max"]) == 2
    assert "model.pooling: 'max' is not a pooling mode" in one_line_error(capsys)
    path = _embed_cfg(tmp_path, st_bert, 12, [{"type": "export"}, {"type": "evaluate"}],
                      gates={"min_retrieval_agreement": 0.5})
    assert main(["run", str(path), "-q"]) == 2
    assert "gates.min_retrieval_agreement: data.eval gives 12 texts; recall@10 needs at least 20" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- end to end
def test_distill_export_ptq_evaluate_sentence_student(tmp_path, st_bert):
    path = _embed_cfg(tmp_path, st_bert, 40, [
        {"type": "distill", "student_layers": 1, "steps": 6, "batch_size": 8, "lr": 1e-3},
        {"type": "export"}, {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate"}],
        gates={"min_retrieval_agreement": 0.05, "min_fidelity": 0.5})
    assert main(["run", str(path), "-q"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    distill, _, ptq, _ = (p["metrics"] for p in rep["passes"][-4:])
    assert {"embedding", "embedding_mse", "contrastive", "hidden"} <= set(distill["term_curves"])  # the defaults
    assert ptq["quantize_embeddings"] is True
    student = Path(rep["passes"][-4]["artifact"]["model_dir"]) if "artifact" in rep["passes"][-4] else None
    model_dir = student or next((tmp_path / "out").rglob("modules.json")).parent
    assert read_spec(model_dir).pooling == "mean"
    onnx_file = tmp_path / "out" / "student.int8.onnx"
    assert [o.name for o in make_session(onnx_file).get_outputs()] == [OUTPUT]
    v = rep["evaluation"]["variants"]
    for name in ("fp32", "int8"):
        assert {"recall_at_10", "spearman", "knn_accuracy", "cosine"} <= set(v[name]), v[name]
        assert 0.5 < v[name]["fidelity"] <= 1.0 + 1e-6
    assert v["fp32"]["size_mb"] > 3 * v["int8"]["size_mb"]  # the embedding table is int8 too
    assert rep["evaluation"]["teacher"]["recall_at_10"] == 1.0
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["min_retrieval_agreement"]["passed"] and gates["min_retrieval_agreement"]["value"] == v["int8"]["recall_at_10"]


def test_vocab_trimmed_sentence_student_stays_a_sentence_model(tmp_path, st_bert):
    """prune (vocabulary only) keeps the sentence-transformers files; on texts whose tokens were all kept the
    trimmed student's embeddings are the teacher's."""
    path = _embed_cfg(tmp_path, st_bert, 48, [
        {"type": "prune", "granularities": ["vocab"], "method": "magnitude", "target": {"params": 10**9}},
        {"type": "export"}, {"type": "evaluate", "latency": False}])
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["eval"] = cfg["data"]["train"]  # every eval token is kept
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["run", str(path), "-q"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["passes"][-3]["metrics"]["vocab_kept"] < 200
    assert read_spec(tmp_path / "out" / "model").pooling == "mean"
    fp32 = rep["evaluation"]["variants"]["fp32"]
    assert fp32["fidelity"] > 0.9999 and fp32["recall_at_10"] == 1.0


def test_student_dropout_off_makes_training_forwards_deterministic(tmp_path, st_bert):
    """`student_dropout: false` turns every dropout of the student off (sentence students learn the teacher's
    embeddings sooner); unset, the model keeps its dropout and the field stays out of the config dump (cache keys)."""
    from transformers import AutoModel

    from compress.distill.objective import DistillObjective
    from compress.passes.distill import DistillConfig

    assert "student_dropout" not in DistillConfig().model_dump(mode="json")
    inputs = _padded(st_bert)
    for off in (None, False):
        torch.manual_seed(0)
        student = AutoModel.from_pretrained(st_bert, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
        teacher = AutoModel.from_pretrained(st_bert).eval()
        cfg = DistillConfig(student_dropout=off)
        DistillObjective(student, teacher, cfg, task="feature-extraction")
        student.train()
        a, b = (student(**inputs).last_hidden_state for _ in range(2))
        assert torch.equal(a, b) is (off is False)
