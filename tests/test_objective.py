"""The distillation objective on its own (compress/distill/objective.py): tiny real transformers built from
configs in code, every term checked against the loss functions called directly on the models' outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.distill import losses as L
from compress.distill.objective import DistillObjective, ObjectiveConfig
from compress.distill.teacher import TeacherCache, prepare_teacher
from compress.errors import InputError

VOCAB = 100


def bert(layers: int, hidden: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.5, attn_implementation="eager"))


def gpt2(layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5))


def batch(rows: int = 6, length: int = 10, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = (torch.arange(length)[None] < torch.randint(4, length + 1, (rows,), generator=g)[:, None]).long()
    out = {"input_ids": ids * mask, "attention_mask": mask}
    if labels:
        out["labels"] = torch.randint(0, 3, (rows,), generator=g)
    return out


def pair():
    """A 4-layer teacher (width 32) and a narrower 2-layer student (width 16): projections are needed."""
    return bert(2, 16, seed=1), prepare_teacher(bert(4, 32, seed=0))


def test_terms_by_name_and_their_weighted_sum():
    student, teacher = pair()
    cfg = ObjectiveConfig(temperature=2.0, weights={"logit": 1.0, "ce": 0.5, "hidden": 2.0, "attention": 0.25,
                                                    "relation": 0.1})
    obj = DistillObjective(student, teacher, cfg, task="sequence-classification")
    assert obj.pairs == [(1, 2), (2, 4)]
    b = batch()
    out = obj(b)
    assert set(out.terms) == {"logit", "ce", "hidden", "attention", "relation"}
    w = cfg.weights
    expect_total = sum(getattr(w, k) * v for k, v in out.terms.items())
    assert float(out.total.detach()) == pytest.approx(float(expect_total.detach()), rel=1e-6)
    assert out.floats() == {k: float(v.detach()) for k, v in out.terms.items()}

    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True, output_attentions=True)
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    terms = out.floats()
    assert terms["logit"] == pytest.approx(float(L.forward_kl(s.logits, t.logits, temperature=2.0)),
                                                      rel=1e-5)
    assert terms["ce"] == pytest.approx(float(F.cross_entropy(s.logits, b["labels"])), rel=1e-5)
    with torch.no_grad():
        hid = [L.hidden_mse(s.hidden_states[i], t.hidden_states[j], obj.projections[str(i)],
                            attention_mask=b["attention_mask"]) for i, j in obj.pairs]
    assert terms["hidden"] == pytest.approx(float(sum(hid) / 2), rel=1e-5)
    att = [L.attention_kl(s.attentions[i - 1], t.attentions[j - 1], b["attention_mask"]) for i, j in obj.pairs]
    assert terms["attention"] == pytest.approx(float(sum(att) / 2), rel=1e-5)

    # the graph reaches the student and the projections, never the teacher
    out.total.backward()
    assert all(p.grad is not None for p in obj.projections.parameters())
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_layers_switch_the_layer_losses_of_other_student_layers_off():
    student, teacher = pair()
    obj = DistillObjective(student, teacher, ObjectiveConfig(weights={"logit": 1.0, "hidden": 1.0}),
                           task="sequence-classification")
    b = batch(labels=False)
    both, first = obj(b), obj(b, layers={1})
    with torch.no_grad():
        s = student(**b, output_hidden_states=True)
        t = teacher(**b, output_hidden_states=True)
    only_1 = L.hidden_mse(s.hidden_states[1], t.hidden_states[2], obj.projections["1"],
                          attention_mask=b["attention_mask"])
    assert first.floats()["hidden"] == pytest.approx(float(only_1.detach()), rel=1e-5)
    assert both.floats()["hidden"] != pytest.approx(float(only_1.detach()), rel=1e-3)
    assert first.floats()["logit"] == both.floats()["logit"]  # the logit loss is always on
    # the reference loss (eval mode, logit loss only) does not depend on the active layers
    assert obj.reference_loss(b) == pytest.approx(both.floats()["logit"], rel=1e-6)


def test_causal_lm_scores_next_token_positions_and_the_fused_head_agrees():
    teacher = prepare_teacher(gpt2(2, seed=0))
    student = gpt2(1, seed=1)
    b = batch(labels=False)
    b["labels"] = torch.where(b["attention_mask"] == 1, b["input_ids"], -100)
    cfg = ObjectiveConfig(logit_loss="jsd", beta=0.3, weights={"logit": 1.0, "hidden": 0.0})
    plain = DistillObjective(student, teacher, cfg, task="causal-lm")(b)
    with torch.no_grad():
        s = student(**{k: v for k, v in b.items() if k != "labels"}).logits
        t = teacher(**{k: v for k, v in b.items() if k != "labels"}).logits
    shifted = L.jsd(s[:, :-1].reshape(-1, VOCAB), t[:, :-1].reshape(-1, VOCAB), beta=0.3, temperature=2.0,
                    labels=b["labels"][:, 1:].reshape(-1))
    assert plain.floats()["logit"] == pytest.approx(float(shifted), rel=1e-5)
    unshifted = L.jsd(s.reshape(-1, VOCAB), t.reshape(-1, VOCAB), beta=0.3, temperature=2.0,
                      labels=b["labels"].reshape(-1))
    assert plain.floats()["logit"] != pytest.approx(float(unshifted), rel=1e-3)

    fused_obj = DistillObjective(student, teacher, cfg.model_copy(update={"fused_lm_head": True}), task="causal-lm")
    fused = fused_obj(b)
    assert fused.floats()["logit"] == pytest.approx(plain.floats()["logit"], rel=1e-5)
    assert fused_obj.fused_steps == 1


def test_taid_term_uses_the_current_t():
    student, teacher = pair()
    obj = DistillObjective(student, teacher, ObjectiveConfig(logit_loss="taid", weights={"logit": 1.0, "hidden": 0.0}),
                           task="sequence-classification")
    b = batch(labels=False)
    with torch.no_grad():
        s, t = student(**b).logits, teacher(**b).logits
    for t_now in (0.4, 0.9):
        obj.taid.t = t_now
        expect = L.taid(s, t, t=t_now, temperature=2.0)
        assert obj(b).floats()["logit"] == pytest.approx(float(expect), rel=1e-5)


def test_teacher_cache_serves_the_second_call(tmp_path):
    student, teacher = pair()
    cfg = ObjectiveConfig(weights={"logit": 1.0, "hidden": 1.0, "attention": 1.0})
    cache = TeacherCache(tmp_path / "cache", namespace="tiny")
    obj = DistillObjective(student, teacher, cfg, task="sequence-classification", teacher_cache=cache)
    b = batch(labels=False)
    first, second = obj(b).floats(), obj(b).floats()
    assert (cache.misses, cache.hits) == (1, 1)
    assert second == pytest.approx(first, rel=1e-6)
    # other captures are other entries
    obj2 = DistillObjective(student, teacher, cfg.model_copy(update={"weights": cfg.weights.model_copy(
        update={"attention": 0.0})}), task="sequence-classification", teacher_cache=cache)
    obj2(b)
    assert cache.misses == 2


def test_bad_weights_and_heads_are_input_errors():
    student, teacher = pair()
    obj = DistillObjective(student, teacher, ObjectiveConfig(weights={"logit": 0.0, "hidden": 0.0}),
                           task="sequence-classification", where="passes: 'kd'")
    with pytest.raises(InputError, match=r"^passes: 'kd'.weights: every loss weight is 0"):
        obj(batch())
    with pytest.raises(InputError, match=r"fused_lm_head: the student's LM head has a bias|no LM head weight"):
        DistillObjective(student, teacher, ObjectiveConfig(fused_lm_head=True), task="sequence-classification")


def test_token_classification_scores_each_labelled_token():
    """NER: one distribution per token, and only the tokens that carry a label (a word's first sub-token) count;
    padding and the -100 positions do not, however their logits move. Checked against a float64 mean of
    per-token KLs computed here."""
    from transformers import BertConfig, BertForTokenClassification

    def ner_bert(layers: int, hidden: int, seed: int):
        torch.manual_seed(seed)
        return BertForTokenClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, initializer_range=0.5))

    student, teacher = ner_bert(1, 16, seed=1), prepare_teacher(ner_bert(2, 32, seed=0))
    b = batch(labels=False)
    labels = torch.randint(0, 5, b["input_ids"].shape, generator=torch.Generator().manual_seed(4))
    labels[b["attention_mask"] == 0] = -100
    labels[:, 0] = -100  # [CLS]
    labels[:, 3] = -100  # a later sub-token
    b["labels"] = labels
    obj = DistillObjective(student, teacher, ObjectiveConfig(temperature=2.0, weights={"logit": 1.0, "hidden": 0.0}),
                           task="token-classification")
    got = obj(b).terms["logit"]
    with torch.no_grad():
        s, t = student(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits.double() / 2.0, \
            teacher(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits.double() / 2.0
    keep = labels != -100
    p, log_q = t[keep].softmax(-1), s[keep].log_softmax(-1)
    expect = (p * (p.log() - log_q)).sum(-1).mean() * 4.0
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    every_token = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * 4.0
    assert abs(every_token.item() - expect.item()) > 1e-3 * expect.item()  # the mask matters here


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_attention_term_compares_maps_before_the_students_attention_dropout(family):
    """HF returns attention probabilities after their dropout: with the attention term on, the objective turns
    the student's attention dropout off, so a training-mode step compares the maps themselves."""
    if family == "bert":
        student, teacher = pair()
        for layer in student.bert.encoder.layer:
            layer.attention.self.dropout.p = 0.9
        student.dropout.p = 0.9  # the classifier's dropout, outside attention: it stays
        task, b = "sequence-classification", batch()
    else:
        student, teacher = gpt2(2, seed=1), prepare_teacher(gpt2(4, seed=0))
        for layer in student.transformer.h:
            layer.attn.attn_dropout.p = 0.9
        student.transformer.drop.p = 0.9  # the embeddings' dropout stays; eval mode only below
        task, b = "causal-lm", batch(labels=False)
    cfg = ObjectiveConfig(weights={"logit": 0.0, "attention": 1.0})
    obj = DistillObjective(student, teacher, cfg, task=task)
    student.eval()
    reference = obj(b).terms["attention"]
    if family == "bert":
        student.train()  # attention dropout off: the same maps as in eval mode
        assert torch.allclose(obj(b).terms["attention"], reference, atol=1e-6)
        assert student.dropout.p == 0.9
    else:
        assert student.transformer.drop.p == 0.9
    assert all(m.p == 0.0 for layer in obj.s_ad.layers for m in layer.attention.module.modules()
               if isinstance(m, torch.nn.Dropout))
