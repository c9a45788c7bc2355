"""Vocabulary trimming (compress.prune.vocab) with the real MiniLM WordPiece tokenizer on a tiny random BERT."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import InputError
from compress.prune.vocab import save_trimmed, trim_tokenizer, trim_vocab
from tests.conftest import minilm_path

TRAIN = ["I love this movie, it was great!", "terrible service and unhelpful staff", "playing games all night long"]


@pytest.fixture(scope="module")
def bert_and_tokenizer():
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    return T.BertForSequenceClassification(cfg).eval(), tok


def test_trimmed_model_and_tokenizer_equal_the_original_on_kept_text(bert_and_tokenizer, tmp_path: Path) -> None:
    model, tok = bert_and_tokenizer
    small, small_tok, kept = trim_vocab(model, tok, TRAIN, extra=["zebra"])
    assert small.config.vocab_size == len(kept) < 60
    assert set(tok.all_special_ids) <= set(kept)
    text = ["this movie was great", "unhelpful staff all night, zebra"]  # every token occurs in TRAIN or extra
    a, b = tok(text, padding=True, return_tensors="pt"), small_tok(text, padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(a["input_ids"][1]) == small_tok.convert_ids_to_tokens(b["input_ids"][1])
    with torch.no_grad():
        torch.testing.assert_close(small(**b).logits, model(**a).logits, atol=1e-6, rtol=1e-5)
    # saved and reloaded with plain transformers in a fresh process: same ids, unknown words -> [UNK]
    folder = save_trimmed(small, small_tok, tmp_path / "trimmed")
    code = ("import sys, transformers as T; t = T.AutoTokenizer.from_pretrained(sys.argv[1]); "
            "T.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]); "
            "print(t('this movie was great')['input_ids'], t('quantum giraffe')['input_ids'], t.unk_token_id, "
            "'compress' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = small_tok("this movie was great")["input_ids"]
    unk = small_tok.unk_token_id
    cls_, sep = small_tok.cls_token_id, small_tok.sep_token_id
    unknown = [cls_] + [unk] * len(tok.tokenize("quantum giraffe")) + [sep]
    assert res.stdout.split() == (f"{expected} {unknown} {unk} False").split()


def test_words_not_kept_map_to_unk(bert_and_tokenizer) -> None:
    model, tok = bert_and_tokenizer
    _, small_tok, kept = trim_vocab(model, tok, TRAIN)
    ids = small_tok("love giraffe")["input_ids"]
    assert ids[2] == small_tok.unk_token_id and ids[1] == kept.index(tok.convert_tokens_to_ids("love"))
    # the original splits 'giraffes' into pieces; the trimmed one keeps that split, each dropped piece is [UNK]
    n_pieces = len(tok.tokenize("giraffes"))
    assert small_tok.tokenize("giraffes") == tok.tokenize("giraffes")
    assert small_tok("giraffes")["input_ids"][1:-1] == [small_tok.unk_token_id] * n_pieces


def test_bpe_tokenizers_and_unknown_extra_tokens_are_input_errors(bert_and_tokenizer) -> None:
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    model, tok = bert_and_tokenizer
    with pytest.raises(InputError, match="extra token 'notarealtoken123' is not in the tokenizer's vocabulary"):
        trim_vocab(model, tok, TRAIN, extra=["notarealtoken123"])
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<unk>": 3}, merges=[("a", "b")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    with pytest.raises(InputError, match="tokenizer model 'BPE' is not supported"):
        trim_tokenizer(fast, [0, 3])
