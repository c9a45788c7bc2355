"""Learned pruning masks (compress.prune.masks): hard-concrete gates, the expected size, the masked forward
against the physically pruned model on tiny random BERT / GPT-2 / LLaMA (GQA), and a short learned run with the
shared trainer and the distillation objective that reaches its target sparsity."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from compress.prune import masks as hc
from compress.prune.importance import count_params
from compress.prune.shrink import shrink


def _tiny(family: str) -> torch.nn.Module:
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        max_position_embeddings=64)).eval()
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, head_dim=8)).eval()


def test_hard_concrete_sampling_and_probability():
    torch.manual_seed(0)
    gate = hc.HardConcrete((4000,), init_keep=0.7)
    z = gate.sample()
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()  # the stretch-and-clamp makes exact 0 and 1 likely
    # P(z > 0) = sigmoid(log_alpha - beta log(-l/r)) = the init_keep asked, and the samples agree with it
    assert float(gate.prob_nonzero().detach()[0]) == pytest.approx(0.7, abs=1e-6)
    assert float((z > 0).float().mean()) == pytest.approx(0.7, abs=0.03)
    # deterministic: round(sum P(z > 0)) units kept per row, with the largest log_alphas
    rows = hc.HardConcrete((3, 10))
    rows.log_alpha.data = torch.linspace(-4, 4, 30).reshape(3, 10)
    det = rows.deterministic()
    for r in range(3):
        keep = round(float(rows.prob_nonzero().detach()[r].sum()))
        assert int((det[r] > 0).sum()) == keep
        if keep:
            assert bool((det[r, -keep:] > 0).all())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_deterministic_masked_model_equals_shrunk(family):
    model = _tiny(family)
    masks = hc.LearnedMasks(model, hc.GRANULARITIES)
    ones = {k: torch.ones_like(g.log_alpha) for k, g in masks.gates.items()}
    assert float(masks.expected_params(model, ones)) == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 100, (2, 10))
    dropped_layers = 0
    for seed in range(3):
        torch.manual_seed(seed)
        for gate in masks.gates.values():
            gate.log_alpha.data = torch.randn_like(gate.log_alpha) * 3
        masks.eval()
        z = masks.deterministic()
        assert any(bool(((v > 0) & (v < 1)).any()) for v in z.values())  # soft values to fold, not only 0/1
        with hc.masked(model, z, masks.kv_groups), torch.no_grad():
            expected = model(input_ids=x).logits
        folded, plan, _ = hc.materialise(model, masks)
        small = shrink(folded, plan)
        with torch.no_grad():
            got = small(input_ids=x).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # the size the masks predict at 0/1 is the pruned model's
        assert hc.exact_params(model, z) == count_params(model, plan) == sum(p.numel() for p in small.parameters())
        dropped_layers += 0 if plan.layers is None else 3 - len(plan.layers)
    assert dropped_layers > 0 or family != "bert"  # whole layers went too (attention and FFN both off)


def test_fit_budget_meets_the_target():
    model = _tiny("bert")
    masks = hc.LearnedMasks(model, ["heads", "ffn", "hidden"])
    torch.manual_seed(1)
    for gate in masks.gates.values():
        gate.log_alpha.data = torch.randn_like(gate.log_alpha)
    budget = int(0.4 * masks.params_start)
    hc.fit_budget(model, masks, budget)
    n = hc.exact_params(model, masks.deterministic(), masks)
    assert n <= budget and n > 0.37 * masks.params_start


@pytest.mark.slow  # ~30 s alone on 2 cores; the fast suite trains masks through the pass (test_prune_pass.py)
def test_learned_masks_reach_target_and_materialise():
    """A short joint run (distillation + Lagrangian, the one trainer) on a tiny BERT: the expected sparsity
    gets to the target within 2 points at the end of the ramp and hold, and the deterministic model, fitted
    to the budget, equals the shrunk model."""
    from compress.distill.objective import ObjectiveConfig
    from compress.train.trainer import TrainConfig

    teacher = _tiny("bert")
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher).train()

    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(4):
            x = torch.randint(0, 100, (8, 12), generator=g)
            yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (8,), generator=g)}

    target = 0.4
    masks, result = hc.learn_masks(
        student, teacher, objective_cfg=ObjectiveConfig(mapping={"strategy": "dynamic"}), task="sequence-classification",
        train_cfg=TrainConfig(steps=60, lr=1e-3, batch_size=8, log_every=100), train_batches=batches,
        target_sparsity=target, granularities=hc.GRANULARITIES, remap_every=5)
    curve = result["sparsity_curve"]
    assert len(curve) == 60 and curve[0]["target"] < 0.05 and curve[-1]["target"] == pytest.approx(target)
    assert {"logit", "hidden", "lagrangian", "expected_sparsity"} <= set(result["term_curves"])
    assert result["lambdas"][1] > 0  # lambda2 only grows under gradient ascent
    # the Lagrangian pulled the expected sparsity up from ~0 to the target's neighbourhood
    assert curve[0]["expected_sparsity"] < 0.05
    assert max(c["expected_sparsity"] for c in curve[-20:]) > target - 0.02
    student.eval()
    hc.fit_budget(student, masks, int((1 - target) * masks.params_start))
    folded, plan, z = hc.materialise(student, masks)
    small = shrink(folded, plan)
    sparsity = 1 - sum(p.numel() for p in small.parameters()) / masks.params_start
    assert abs(sparsity - target) <= 0.02
    x = torch.randint(0, 100, (2, 9))
    with hc.masked(student, z, masks.kv_groups), torch.no_grad():
        expected = student(input_ids=x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, expected, atol=1e-5, rtol=1e-4)
    assert not math.isnan(result["final_loss"])
