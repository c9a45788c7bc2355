"""Token classification (NER) end to end: per-word labels from the data, sub-token alignment in the batches, the
token-level metric against scikit-learn, and finetune -> export -> ptq -> evaluate on a tiny BERT."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.data import collate
from compress.data.sources import label_mapping, load_records
from compress.data.spec import DataSpec
from compress.errors import InputError
from compress.tasks import IGNORE_INDEX, get_task
from tests.conftest import make_config, minilm_path, write_jsonl

PER = ["alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry"]
LOC = ["paris", "london", "berlin", "tokyo", "rome", "madrid", "vienna", "oslo"]
OTHER = ["went", "to", "met", "in", "the", "and", "visited", "from", "today", "with"]


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences of 4-7 words; a word's tag (PER, LOC, O) follows from the word itself."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(4, 7)):
            kind = rng.choice(["PER", "LOC", "O", "O"])
            words.append(rng.choice({"PER": PER, "LOC": LOC, "O": OTHER}[kind]))
            tags.append(kind)
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _records(tmp_path: Path, rows: list[dict]):
    write_jsonl(tmp_path / "ner.jsonl", rows)
    return load_records(DataSpec(path=str(tmp_path / "ner.jsonl"), text="tokens", label="ner_tags"))


def test_labels_go_to_the_first_sub_token_of_each_word(tmp_path: Path, tokenizer) -> None:
    rows = [{"tokens": ["alice", "visited", "ouagadougou"], "ner_tags": ["PER", "O", "LOC"]}]
    rec = _records(tmp_path, rows)
    assert rec.texts == ["alice visited ouagadougou"] and rec.labels == [("PER", "O", "LOC")]
    label2id, _ = label_mapping(rec)
    assert label2id == {"LOC": 0, "O": 1, "PER": 2}
    batch = next(collate.token_batches(rec, tokenizer, batch_size=4, max_length=32, label2id=label2id))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(pieces) > 5  # [CLS] alice visited ou ##aga ... [SEP]: "ouagadougou" is five sub-tokens
    expected = [IGNORE_INDEX] * len(pieces)
    expected[1], expected[2], expected[3] = 2, 1, 0  # alice, visited, the first piece of ouagadougou
    assert labels.tolist() == expected


def test_one_label_per_word_is_required(tmp_path: Path, tokenizer) -> None:
    rec = _records(tmp_path, [{"tokens": ["alice", "went"], "ner_tags": ["PER"]}])
    with pytest.raises(InputError, match="row 0 has 2 words but 1 labels"):
        collate.token_batches(rec, tokenizer, batch_size=2, max_length=16, label2id={"PER": 0, "O": 1})


def test_token_metric_matches_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    g = torch.Generator().manual_seed(0)
    batches, s_out, t_out = [], [], []
    for rows, length in ((3, 7), (2, 5)):
        labels = torch.randint(0, 4, (rows, length), generator=g)
        labels[torch.rand(rows, length, generator=g) < 0.3] = IGNORE_INDEX
        batches.append({"labels": labels})
        s_out.append(torch.randn(rows, length, 4, generator=g))
        t_out.append(torch.randn(rows, length, 4, generator=g))
    scores = get_task("token-classification").score(batches, s_out, t_out)
    keep = [b["labels"] != IGNORE_INDEX for b in batches]
    y = torch.cat([b["labels"][k] for b, k in zip(batches, keep)]).numpy()
    p = torch.cat([o.argmax(-1)[k] for o, k in zip(s_out, keep)]).numpy()
    tp = torch.cat([o.argmax(-1)[k] for o, k in zip(t_out, keep)]).numpy()
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert scores["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    assert scores["fidelity"] == pytest.approx(accuracy_score(tp, p))
    assert len(y) < sum(b["labels"].numel() for b in batches)  # the ignored positions are left out


def test_ner_pipeline_finetune_export_ptq_evaluate(tmp_path: Path, tiny_bert_dir: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    for name, n, seed in (("train", 160, 1), ("eval", 32, 2), ("calib", 16, 3)):
        write_jsonl(d / f"{name}.jsonl", ner_rows(n, seed))
    spec = {"text": "tokens", "label": "ner_tags"}
    cfg = make_config(
        tmp_path, tiny_bert_dir, d,
        passes=[{"type": "finetune", "epochs": 4, "batch_size": 16, "lr": 3e-3}, {"type": "export"},
                {"type": "ptq", "methods": ["dynamic", "static"]}, {"type": "evaluate", "batch_size": 16}],
        data={split: {"path": str(d / f"{f}.jsonl"), **spec}
              for split, f in (("train", "train"), ("eval", "eval"), ("calibration", "calib"))},
    )
    raw = cfg.read_text().replace("sequence-classification", "token-classification")
    cfg.write_text(raw)
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    rep = json.loads((out / "report.json").read_text())
    ev = rep["evaluation"]
    assert ev["main_metric"] == "accuracy"
    assert set(ev["variants"]) == {"fp32", "int8-dynamic", "int8-static", "int8"}
    tags = [t for r in ner_rows(32, 2) for t in r["ner_tags"]]
    majority = max(tags.count(t) for t in set(tags)) / len(tags)
    assert ev["teacher"]["accuracy"] > majority + 0.1  # finetuning learnt the tags, beyond always "O"
    assert ev["variants"]["fp32"]["accuracy"] == pytest.approx(ev["teacher"]["accuracy"], abs=1e-6)
    assert ev["variants"]["fp32"]["fidelity"] == 1.0
    assert ev["variants"]["int8"]["fidelity"] > 0.8
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "student.int8.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input_ids": np.ones((2, 9), np.int64), "attention_mask": np.ones((2, 9), np.int64),
                             "token_type_ids": np.zeros((2, 9), np.int64)})[0]
    assert logits.shape == (2, 9, 3)  # one score per token and tag


def test_ner_distill_into_a_shallower_student(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """finetune -> distill (one of the two layers, the logit loss per labelled token) -> export -> evaluate: the
    student keeps the tags the teacher learnt."""
    d = tmp_path / "data"
    d.mkdir()
    for name, n, seed in (("train", 160, 1), ("eval", 32, 2)):
        write_jsonl(d / f"{name}.jsonl", ner_rows(n, seed))
    spec = {"text": "tokens", "label": "ner_tags"}
    cfg = make_config(
        tmp_path, tiny_bert_dir, d,
        passes=[{"type": "finetune", "epochs": 4, "batch_size": 16, "lr": 3e-3},
                {"type": "distill", "student_layers": 1, "epochs": 3, "batch_size": 16, "lr": 3e-3,
                 "weights": {"logit": 1.0, "hidden": 0.0}},
                {"type": "export"}, {"type": "evaluate", "batch_size": 16}],
        data={split: {"path": str(d / f"{f}.jsonl"), **spec} for split, f in (("train", "train"), ("eval", "eval"))},
    )
    cfg.write_text(cfg.read_text().replace("sequence-classification", "token-classification"))
    assert main(["run", str(cfg), "-q"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    ev = rep["evaluation"]
    tags = [t for r in ner_rows(32, 2) for t in r["ner_tags"]]
    majority = max(tags.count(t) for t in set(tags)) / len(tags)
    assert rep["passes"][1]["metrics"]["student_layers"] == 1
    assert ev["variants"]["fp32"]["params"] < ev["teacher"]["params"]
    assert ev["variants"]["fp32"]["accuracy"] > majority + 0.1
    assert ev["variants"]["fp32"]["fidelity"] > 0.8
