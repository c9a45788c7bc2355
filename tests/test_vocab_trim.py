"""Vocabulary trimming (compress.prune.vocab) with the real MiniLM WordPiece tokenizer on a tiny random BERT."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.errors import InputError
from compress.prune.vocab import save_trimmed, trim_tokenizer, trim_vocab
from tests.conftest import minilm_path

TRAIN = ["I love this movie, it was great!", "terrible service and unhelpful staff", "playing games all night long"]
KEPT_TEXT = ["this movie was great", "unhelpful staff all night, zebra"]  # every token occurs in TRAIN or extra


@pytest.fixture(scope="module")
def bert_and_tokenizer():
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    return T.BertForSequenceClassification(cfg).eval(), tok


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_trimmed_model_and_tokenizer_equal_the_original_on_kept_text(bert_and_tokenizer, tmp_path: Path) -> None:
    model, tok = bert_and_tokenizer
    small, small_tok, kept = trim_vocab(model, tok, TRAIN, extra=["zebra"])
    assert small.config.vocab_size == len(kept) + 1 < 60  # + the shared row of dropped tokens
    assert set(tok.all_special_ids) <= set(kept)
    a, b = tok(KEPT_TEXT, padding=True, return_tensors="pt"), small_tok(KEPT_TEXT, padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(a["input_ids"][1]) == small_tok.convert_ids_to_tokens(b["input_ids"][1])
    assert b["input_ids"].max() < len(kept)
    torch.testing.assert_close(_logits(small, b), _logits(model, a), atol=1e-6, rtol=1e-5)
    # saved and reloaded by the plain Auto classes (a BertTokenizer and a BertForSequenceClassification: nothing of
    # compress in the folder): same ids; a dropped word -> the shared row of dropped tokens
    import transformers as T

    folder = save_trimmed(small, small_tok, tmp_path / "trimmed")
    assert not (tmp_path / "trimmed.tmp").exists()
    t = T.AutoTokenizer.from_pretrained(folder)
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == "BertForSequenceClassification"
    assert t("this movie was great")["input_ids"] == small_tok("this movie was great")["input_ids"]
    n_pieces = len(tok.tokenize("quantum giraffe"))
    assert t("quantum giraffe")["input_ids"] == [t.cls_token_id, *[len(kept)] * n_pieces, t.sep_token_id]
    torch.testing.assert_close(_logits(reloaded, b), _logits(small, b), atol=1e-6, rtol=1e-5)


def test_tokens_not_kept_reach_the_model_as_unk(bert_and_tokenizer) -> None:
    model, tok = bert_and_tokenizer
    small, small_tok, kept = trim_vocab(model, tok, TRAIN)
    # the trimmed tokenizer splits a word with dropped pieces as the original does; each dropped piece -> id K
    assert small_tok.tokenize("giraffes love") == tok.tokenize("giraffes love")
    ids = small_tok("giraffes love", return_tensors="pt")
    n = len(tok.tokenize("giraffes"))
    assert ids["input_ids"][0, 1:1 + n].tolist() == [len(kept)] * n
    # ... and the trimmed model computes what the original computes with [UNK] in their place
    original = tok("giraffes love", return_tensors="pt")
    original["input_ids"][0, 1:1 + n] = tok.unk_token_id
    torch.testing.assert_close(_logits(small, ids), _logits(model, original), atol=1e-6, rtol=1e-5)


def test_a_plain_transformers_resave_stays_a_valid_tokenizer(bert_and_tokenizer, tmp_path: Path) -> None:
    import transformers as T

    model, tok = bert_and_tokenizer
    _, small_tok, kept = trim_vocab(model, tok, TRAIN)
    small_tok.save_pretrained(tmp_path / "a")
    resaved = T.AutoTokenizer.from_pretrained(tmp_path / "a")
    T.PreTrainedTokenizerFast.save_pretrained(resaved, tmp_path / "b")  # plain save: one token per id survives
    again = T.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert again(KEPT_TEXT[0])["input_ids"] == small_tok(KEPT_TEXT[0])["input_ids"]
    assert max(again("quantum giraffes")["input_ids"]) <= len(kept)


def test_split_fallback_spells_dropped_words_with_kept_pieces(bert_and_tokenizer, tmp_path: Path) -> None:
    """fallback "split": no shared row; kept text splits and computes as before, a word with dropped pieces is
    spelled with kept pieces (down to single characters of the training texts), never [UNK]; the folder is an
    ordinary one that plain transformers saves and reloads with the same ids."""
    import transformers as T

    model, tok = bert_and_tokenizer
    small, small_tok, kept = trim_vocab(model, tok, TRAIN, extra=["zebra"], fallback="split")
    assert small.config.vocab_size == len(kept) == len(small_tok)
    a, b = tok(KEPT_TEXT, padding=True, return_tensors="pt"), small_tok(KEPT_TEXT, padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(a["input_ids"][1]) == small_tok.convert_ids_to_tokens(b["input_ids"][1])
    torch.testing.assert_close(_logits(small, b), _logits(model, a), atol=1e-6, rtol=1e-5)
    # "giraffes" (gi ##raf ##fe ##s): most of its pieces occur in no TRAIN text, but each of its letters does
    assert not set(tok.convert_tokens_to_ids(tok.tokenize("giraffes"))) <= set(kept)
    pieces = small_tok.tokenize("giraffes love")
    assert small_tok.unk_token not in pieces and "".join(p.removeprefix("##") for p in pieces[:-1]) == "giraffes"
    ids = small_tok("giraffes love")["input_ids"]
    assert [kept[i] for i in ids] == tok.convert_tokens_to_ids([tok.cls_token, *pieces, tok.sep_token])
    assert small_tok.tokenize("中") == [small_tok.unk_token]  # a character no training text has
    folder = save_trimmed(small, small_tok, tmp_path / "split")
    T.PreTrainedTokenizerFast.save_pretrained(T.AutoTokenizer.from_pretrained(folder), tmp_path / "resaved")
    for path in (folder, tmp_path / "resaved"):
        assert T.AutoTokenizer.from_pretrained(path)("giraffes love")["input_ids"] == ids


def test_max_tokens_keeps_the_most_frequent(bert_and_tokenizer) -> None:
    from compress.prune.vocab import kept_token_ids

    _, tok = bert_and_tokenizer
    texts = ["the cat", "the dog", "the cat and the dog", "a bird"]
    kept = kept_token_ids(tok, texts, max_tokens=3)
    specials = set(tok.all_special_ids)
    assert set(kept) - specials == set(tok.convert_tokens_to_ids(["the", "cat", "dog"]))  # 4, 2, 2 uses; ties: lower id
    assert specials <= set(kept)
    with_chars = set(kept_token_ids(tok, texts, max_tokens=3, char_pieces=True))
    assert set(tok.convert_tokens_to_ids(["b", "##b", "r", "##r"])) <= with_chars - set(kept)


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
