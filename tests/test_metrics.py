"""The metrics `evaluate` reports, against independent computations: accuracy and F1 against scikit-learn,
perplexity against the model's own Hugging Face loss (a `labels=` forward), retrieval agreement and cosine on a
hand-built case, causal-LM fidelity on hand-picked positions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from compress.errors import InputError
from compress.tasks import TASKS, _classification, get_task, mean_pool, synthetic_inputs


def _logits_with_argmax(preds: np.ndarray, n_classes: int, seed: int) -> torch.Tensor:
    """Random logits whose argmax per row is `preds` (not one-hot: the other classes get random values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(preds), n_classes, generator=g)
    x[torch.arange(len(preds)), torch.as_tensor(preds)] = x.max() + 1.0 + torch.rand(len(preds), generator=g)
    return x


@pytest.mark.parametrize("task", ["sequence-classification", "image-classification"])
def test_classification_scores_match_sklearn(task: str) -> None:
    rng = np.random.default_rng(0)
    n, k = 45, 3
    labels = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))  # about 70% right, unbalanced errors
    tpreds = np.where(rng.random(n) < 0.5, preds, rng.integers(0, k, n))
    cuts = [0, 16, 32, n]  # three batches of unequal size
    batches = [{"labels": torch.as_tensor(labels[a:b])} for a, b in zip(cuts, cuts[1:])]
    s_out = [_logits_with_argmax(preds[a:b], k, seed=a) for a, b in zip(cuts, cuts[1:])]
    t_out = [_logits_with_argmax(tpreds[a:b], k, seed=100 + a) for a, b in zip(cuts, cuts[1:])]
    acc, f1, fid = accuracy_score(labels, preds), f1_score(labels, preds, average="macro"), accuracy_score(tpreds, preds)
    # the three references differ, so a metric computed from the wrong pair of vectors cannot pass
    assert len({round(acc, 6), round(f1, 6), round(fid, 6), round(accuracy_score(labels, tpreds), 6)}) == 4
    # the table's scorer, and one built now by the same factory (the table's closures exist from import time)
    for score in (get_task(task).score, _classification(per_token=False)):
        got = score(batches, s_out, t_out)
        assert set(got) == {"accuracy", "f1_macro", "fidelity"}
        assert got["accuracy"] == pytest.approx(acc, abs=1e-6)  # float32 mean; one example is 1/45
        assert got["f1_macro"] == pytest.approx(f1, abs=1e-6)
        assert got["fidelity"] == pytest.approx(fid, abs=1e-6)
    one = [{"labels": torch.tensor([2])}]  # a single labelled example is enough to score
    s1, t1 = [_logits_with_argmax(np.array([2]), k, 1)], [_logits_with_argmax(np.array([0]), k, 2)]
    assert _classification(per_token=False)(one, s1, t1) == {"accuracy": 1.0, "f1_macro": 1.0, "fidelity": 0.0}


def test_retrieval_agreement_and_cosine_on_a_hand_built_case() -> None:
    # sentence embeddings: the teacher's nearest neighbours are 0<->1 and 2<->3; the student's item 3 moved
    # next to item 1, so its nearest neighbour changes (3 -> 1) and the agreement is 3 of 4
    teacher = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    student = np.array([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.7, 0.3]])

    def tokens(emb: np.ndarray) -> torch.Tensor:
        """[B, 3, D]: two valid tokens equal to the embedding (their mean) and a padded one holding junk."""
        out = np.repeat(emb[:, None, :], 3, axis=1)
        out[:, 2, :] = 1000.0
        return torch.tensor(out, dtype=torch.float32)

    mask = torch.tensor([[1, 1, 0]] * 4)
    batches = [{"attention_mask": mask[:2]}, {"attention_mask": mask[2:]}]
    # rows scaled differently: cosine and nearest neighbours do not change, a normalisation over the wrong
    # dimension (or none) would
    s, t = tokens(student * np.array([[1.0], [3.0], [0.5], [10.0]])), tokens(teacher * np.array([[2.0], [1.0], [7.0], [1.0]]))
    got = get_task("feature-extraction").score(batches, [s[:2], s[2:]], [t[:2], t[2:]])
    assert got["retrieval_agreement"] == pytest.approx(0.75)
    cos = (student * teacher).sum(1) / np.linalg.norm(student, axis=1) / np.linalg.norm(teacher, axis=1)
    assert got["cosine"] == pytest.approx(float(cos.mean()), rel=1e-6)
    assert got["fidelity"] == got["cosine"]
    same = get_task("feature-extraction").score(batches, [t[:2], t[2:]], [t[:2], t[2:]])
    assert same["retrieval_agreement"] == 1.0 and same["cosine"] == pytest.approx(1.0)
    one = get_task("feature-extraction").score([{"attention_mask": mask[:1]}], [s[:1]], [t[:1]])  # no neighbour
    assert one["retrieval_agreement"] == 1.0


def test_perplexity_is_the_exponent_of_the_models_own_loss(tiny_gpt2_dir) -> None:
    """exp(token-weighted mean of the HF loss with labels=) over two padded batches: the shift of the labels,
    the ignored padding and the weighting of batches of different token counts all have to be right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import collate
    from compress.data.sources import Records
    from tests.conftest import sentiment_rows

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    texts = [r["text"] for r in sentiment_rows(7)]
    texts[1] = "short"
    texts[5] = "a somewhat longer sentence than the others in this little batch of words"
    records = Records(texts=texts, text_pairs=None, labels=None, images=None, fingerprint="")
    batches = list(collate.causal_lm_batches(records, tok, batch_size=4, max_length=24))
    assert len(batches) == 2 and any((b["attention_mask"] == 0).any() for b in batches)
    nll, count, outs = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            out = model(**b)  # labels= : HF shifts them and ignores -100
            n = int((b["labels"][:, 1:] != -100).sum())
            nll += float(out.loss) * n
            count += n
            outs.append(out.logits)
    got = get_task("causal-lm").score(batches, outs, outs)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["fidelity"] == 1.0


def test_causal_lm_fidelity_counts_the_predicted_positions() -> None:
    """Position t predicts token t+1: the last real token (whose next token is padding) is not scored."""
    v = 5
    labels = torch.tensor([[2, 4, 1, -100]])
    s_pred, t_pred = [1, 2, 3, 0], [1, 0, 3, 0]  # agree at positions 0 and 2, differ at 1

    def logits(pred: list[int]) -> torch.Tensor:
        x = torch.zeros(1, 4, v)
        x[0, torch.arange(4), torch.tensor(pred)] = 5.0
        return x

    got = get_task("causal-lm").score([{"labels": labels}], [logits(s_pred)], [logits(t_pred)])
    assert got["fidelity"] == pytest.approx(1 / 2)  # scored positions 0 and 1 (labels[1], labels[2])
    # perplexity of these logits on tokens 4 and 1, by hand
    lp = torch.log_softmax(logits(s_pred)[0], -1)
    assert got["perplexity"] == pytest.approx(math.exp(-(lp[0, 4] + lp[1, 1]).item() / 2), rel=1e-6)
    # one scored position: no floor on the count other than 1
    one = get_task("causal-lm").score([{"labels": torch.tensor([[2, 1, -100, -100]])}], [logits(s_pred)], [logits(t_pred)])
    assert one["fidelity"] == 1.0 and one["perplexity"] == pytest.approx(math.exp(-lp[0, 1].item()), rel=1e-6)


def test_token_classification_scores_only_the_labelled_positions() -> None:
    """[B, T, C] logits, labels with ignored (-100) positions: the scores equal scikit-learn's on the kept
    positions, which differ from the scores over every position."""
    rng = np.random.default_rng(3)
    batches, s_out, t_out, y, p, tp = [], [], [], [], [], []
    for rows, length in ((2, 6), (3, 4)):
        labels = rng.integers(0, 3, (rows, length))
        labels[rng.random((rows, length)) < 0.35] = -100
        s = torch.tensor(rng.standard_normal((rows, length, 3)), dtype=torch.float32)
        t = torch.tensor(rng.standard_normal((rows, length, 3)), dtype=torch.float32)
        batches.append({"labels": torch.as_tensor(labels)})
        s_out.append(s)
        t_out.append(t)
        keep = labels != -100
        y.append(labels[keep])
        p.append(s.argmax(-1).numpy()[keep])
        tp.append(t.argmax(-1).numpy()[keep])
    y, p, tp = np.concatenate(y), np.concatenate(p), np.concatenate(tp)
    for score in (get_task("token-classification").score, _classification(per_token=True)):
        got = score(batches, s_out, t_out)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-6)
        assert got["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-6)
        assert got["fidelity"] == pytest.approx(accuracy_score(tp, p), abs=1e-6)
    all_s = np.concatenate([o.argmax(-1).numpy().ravel() for o in s_out])
    all_t = np.concatenate([o.argmax(-1).numpy().ravel() for o in t_out])
    assert abs(accuracy_score(all_t, all_s) - got["fidelity"]) > 1e-3  # the mask matters for this case
    for score in (get_task("token-classification").score, _classification(per_token=True)):
        with pytest.raises(InputError, match=r"^data.eval: no labelled positions to score \(every label is ignored\)$"):
            score([{"labels": torch.full((2, 6), -100)}], s_out[:1], t_out[:1])


def test_mean_pool_and_features_without_a_mask() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]]])
    assert torch.equal(mean_pool(h, None), torch.tensor([[3.0, 3.0]]))
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(mean_pool(h, torch.zeros(1, 3)), torch.zeros(1, 2))  # no valid token: 0, not NaN
    two = torch.cat([h, 2 * h])
    pooled = mean_pool(two, torch.tensor([[True, False, False], [True, True, True]]))  # 1 and 3 valid tokens
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0], [6.0, 6.0]]))
    s = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    t = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    got = get_task("feature-extraction").score([{}], [s], [t])
    cos = torch.nn.functional.cosine_similarity(s.double().mean(1), t.double().mean(1), dim=-1)
    assert got["cosine"] == pytest.approx(float(cos.mean()), rel=1e-5)


def test_task_table_is_consistent() -> None:
    """Every task's main metric is one of the keys its score returns; perplexity is the only lower-is-better
    metric; classes exist for the labelled-class tasks only; an unknown task is a one-line InputError."""
    rng = np.random.default_rng(4)
    batches_2d = [{"labels": torch.as_tensor(rng.integers(0, 3, 4)), "attention_mask": torch.ones(4, 3)}]
    for name, spec in TASKS.items():
        assert spec.name == name
        if spec.labels == "token-class":
            batch = [{"labels": torch.as_tensor(rng.integers(0, 3, (2, 3)))}]
            out = [torch.randn(2, 3, 3)]
        elif spec.labels == "next-token":
            batch = [{"labels": torch.as_tensor(rng.integers(0, 5, (2, 4)))}]
            out = [torch.randn(2, 4, 5)]
        elif spec.labels == "none":
            batch, out = batches_2d, [torch.randn(4, 3, 6)]
        else:
            batch, out = batches_2d, [torch.randn(4, 3)]
        assert spec.metric in spec.score(batch, out, out), name
        assert spec.higher_is_better == (spec.metric != "perplexity"), name
        assert spec.has_classes == (spec.labels in ("class", "token-class")), name
    assert [n for n, s in TASKS.items() if s.has_classes] == ["sequence-classification", "token-classification",
                                                              "image-classification"]
    assert TASKS["feature-extraction"].distill_terms == "features" and TASKS["causal-lm"].output == "logits"
    assert TASKS["feature-extraction"].output == "last_hidden_state"
    with pytest.raises(InputError, match="^model.task: 'nope' is not one of sequence-classification, "):
        get_task("nope")


def test_synthetic_inputs_shapes_and_sizes_from_the_config() -> None:
    from types import SimpleNamespace

    text = get_task("sequence-classification").synthetic_inputs(SimpleNamespace(vocab_size=7), batch_size=3, seq_len=5)
    assert set(text) == {"input_ids", "attention_mask"}
    assert text["input_ids"].shape == (3, 5) and text["input_ids"].dtype == np.int64
    assert text["input_ids"].min() >= 0 and text["input_ids"].max() < 7 and len(np.unique(text["input_ids"])) > 1
    assert (text["attention_mask"] == 1).all() and text["attention_mask"].shape == (3, 5)
    default = get_task("causal-lm").synthetic_inputs(None, batch_size=64, seed=1)
    assert default["input_ids"].shape == (64, 16) and default["input_ids"].max() >= 90  # vocabulary 100
    assert not np.array_equal(default["input_ids"], get_task("causal-lm").synthetic_inputs(None, batch_size=64)["input_ids"])
    img = get_task("image-classification").synthetic_inputs(SimpleNamespace(image_size=8, num_channels=1), batch_size=2)
    assert img["pixel_values"].shape == (2, 1, 8, 8) and img["pixel_values"].dtype == np.float32
    assert get_task("image-classification").synthetic_inputs(None, batch_size=1)["pixel_values"].shape == (1, 3, 224, 224)
    assert get_task("image-classification").synthetic_inputs(None, batch_size=1, image_size=4)["pixel_values"].shape == (1, 3, 4, 4)
    assert 0.5 < img["pixel_values"].std() < 2.0  # standard normal
    seeded = get_task("causal-lm").synthetic_inputs(None, batch_size=64, seed=1)["input_ids"]
    assert np.array_equal(default["input_ids"], seeded)  # the seed reaches the generator
    assert 95 <= default["input_ids"].max() <= 99 and default["input_ids"].min() == 0
    # the builder's own defaults: `compress bench` calls it with the batch size only
    plain = synthetic_inputs("text", batch_size=40)
    assert plain["input_ids"].shape == (40, 16) and plain["input_ids"].min() == 0 and plain["input_ids"].max() == 99
    assert np.array_equal(plain["input_ids"], synthetic_inputs("text", batch_size=40, seed=0)["input_ids"])
    assert synthetic_inputs("image", batch_size=1)["pixel_values"].shape == (1, 3, 224, 224)


def test_evaluate_pass_validation_and_output_field() -> None:
    """The pass asks for data.eval, and reads the task's output field as float32."""
    from types import SimpleNamespace

    from compress.passes.evaluate import Evaluate, EvaluateConfig, _output

    ev = Evaluate(EvaluateConfig())
    run = SimpleNamespace(data=SimpleNamespace(eval=object()), target=SimpleNamespace(edge=None))
    assert ev.validate(run) is None
    assert ev.validate(SimpleNamespace(data=SimpleNamespace(eval=None))) == "evaluate needs data.eval"
    out = _output(SimpleNamespace(logits=torch.tensor([1.5, -2.0], dtype=torch.float16), other=None), "logits")
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -2.0]
