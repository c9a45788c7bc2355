"""Layer maps: static strategies by hand, explicit pairs validation, CoFi's dynamic map on planted data."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compress.distill.mapping import (
    MappingConfig,
    auto_map,
    default_dynamic_teacher_layers,
    dynamic_map,
    layer_distances,
    layer_map,
)
from compress.errors import InputError

# (M, L) -> the uniform map ceil(i*L/M), worked out by hand
UNIFORM = {
    (3, 12): [(1, 4), (2, 8), (3, 12)],
    (6, 12): [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)],
    (4, 4): [(1, 1), (2, 2), (3, 3), (4, 4)],
    (12, 6): [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (7, 4), (8, 4), (9, 5), (10, 5), (11, 6), (12, 6)],
    (5, 12): [(1, 3), (2, 5), (3, 8), (4, 10), (5, 12)],  # 2.4, 4.8, 7.2, 9.6, 12
    (4, 6): [(1, 2), (2, 3), (3, 5), (4, 6)],  # 1.5, 3, 4.5, 6
    (1, 7): [(1, 7)],
}


@pytest.mark.parametrize("depths", sorted(UNIFORM))
def test_uniform_by_hand(depths: tuple[int, int]) -> None:
    m, l = depths
    assert layer_map(m, l, "uniform") == UNIFORM[depths]
    # the formula itself, in floating point, agrees with the integer ceiling used by the code
    assert UNIFORM[depths] == [(i, math.ceil(i * l / m)) for i in range(1, m + 1)]


@pytest.mark.parametrize("depths", sorted(UNIFORM))
def test_last_and_uniform_last(depths: tuple[int, int]) -> None:
    m, l = depths
    assert layer_map(m, l, "last") == [(m, l)]
    ul = layer_map(m, l, "uniform+last")
    assert (m, l) in ul and ul[-1] == (m, l)
    assert ul == UNIFORM[depths]


def test_auto_is_identity_for_equal_depths_else_uniform() -> None:
    assert auto_map(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert auto_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert auto_map(12, 6) == UNIFORM[(12, 6)]
    assert layer_map(6, 12) == UNIFORM[(6, 12)]  # 'auto' is the default strategy
    assert layer_map(6, 12, "dynamic") == auto_map(6, 12)  # dynamic starts from the auto map


def test_explicit_pairs_are_validated_and_sorted() -> None:
    assert layer_map(3, 12, "explicit", [(3, 12), (1, 2), (0, 0), (1, 2)]) == [(0, 0), (1, 2), (3, 12)]
    with pytest.raises(InputError, match=r"pairs\[1\] = \(4, 12\).*student layers are 0\.\.3"):
        layer_map(3, 12, "explicit", [(1, 4), (4, 12)])
    with pytest.raises(InputError, match=r"pairs\[0\] = \(2, 13\).*teacher layers are 0\.\.12"):
        layer_map(3, 12, "explicit", [(2, 13)])
    with pytest.raises(InputError, match=r"pairs\[0\] = \(-1, 3\)"):
        layer_map(3, 12, "explicit", [(-1, 3)])
    with pytest.raises(InputError, match=r"pairs\[0\].*pair of two integers"):
        layer_map(3, 12, "explicit", [(1, 2, 3)])
    with pytest.raises(InputError, match="integers"):
        layer_map(3, 12, "explicit", [(1.5, 2)])
    with pytest.raises(InputError, match="needs pairs"):
        layer_map(3, 12, "explicit", None)


def test_bad_strategy_and_depths() -> None:
    with pytest.raises(InputError, match="unknown strategy 'skip'"):
        layer_map(3, 12, "skip")
    with pytest.raises(InputError, match="student has 0 layers"):
        layer_map(0, 12, "uniform")
    with pytest.raises(InputError, match="only used with strategy 'explicit'"):
        layer_map(3, 12, "uniform", [(1, 1)])


def test_mapping_config() -> None:
    assert MappingConfig().resolve(3, 12) == [(1, 4), (2, 8), (3, 12)]
    cfg = MappingConfig(strategy="explicit", pairs=[[1, 6], [2, 12]])
    assert cfg.resolve(2, 12) == [(1, 6), (2, 12)]
    with pytest.raises(InputError, match="out of range"):
        cfg.resolve(2, 6)
    with pytest.raises(ValidationError, match="needs `pairs`"):
        MappingConfig(strategy="explicit")
    with pytest.raises(ValidationError, match="only used with strategy 'explicit'"):
        MappingConfig(strategy="last", pairs=[[1, 1]])
    with pytest.raises(ValidationError):
        MappingConfig(strategy="nope")
    with pytest.raises(ValidationError):
        MappingConfig(extra_field=1)


def test_default_dynamic_teacher_layers() -> None:
    assert default_dynamic_teacher_layers(12) == [3, 6, 9, 12]  # CoFi's choice
    assert default_dynamic_teacher_layers(6) == [2, 3, 5, 6]
    assert default_dynamic_teacher_layers(2) == [1, 2]


# -- dynamic map on a real (tiny, random) BERT teacher ---------------------------------------------


@pytest.fixture(scope="module")
def teacher_hidden() -> list[torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32,
                     initializer_range=0.5)  # large weights: layers differ clearly from each other
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hs = list(out.hidden_states)
    assert len(hs) == 7
    return hs


def _plant(teacher_hidden: list[torch.Tensor], source: dict[int, int], width: int, seed: int = 0):
    """Student hidden states (embeddings + len(source) layers, hidden size `width`): student layer j =
    A h_T^{source[j]} + noise, and the projection W = pinv(A) that undoes A."""
    g = torch.Generator().manual_seed(seed)
    d = teacher_hidden[0].shape[-1]
    a = torch.randn(d, width, generator=g)  # h @ a : [.., d] -> [.., width]
    student = [torch.randn(*teacher_hidden[0].shape[:-1], width, generator=g)]
    for j in range(1, len(source) + 1):
        h = teacher_hidden[source[j]] @ a
        student.append(h + 0.01 * torch.randn(h.shape, generator=g))
    proj = nn.Linear(width, d, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.linalg.pinv(a).T)  # W x = x @ pinv(a)
    return student, proj


def test_dynamic_map_recovers_planted_correspondence(teacher_hidden: list[torch.Tensor]) -> None:
    student, proj = _plant(teacher_hidden, {1: 6, 2: 2, 3: 4}, width=24)
    pairs = dynamic_map(student, teacher_hidden, proj, teacher_layers=[2, 4, 6])
    assert pairs == [(1, 6), (2, 2), (3, 4)]
    # the planted pairs are far better than every other candidate
    dist = layer_distances(student, teacher_hidden, proj, student_layers=[1, 2, 3], teacher_layers=[2, 4, 6])
    best = dist.min(dim=1).values
    second = dist.topk(2, dim=1, largest=False).values[:, 1]
    assert torch.all(best * 10 < second)


def test_dynamic_map_only_uses_unpruned_layers(teacher_hidden: list[torch.Tensor]) -> None:
    student, proj = _plant(teacher_hidden, {1: 2, 2: 4, 3: 6}, width=24)
    full = dynamic_map(student, teacher_hidden, proj, teacher_layers=[2, 4, 6])
    assert full == [(1, 2), (2, 4), (3, 6)]
    pruned = dynamic_map(student, teacher_hidden, proj, student_layers=[1, 3], teacher_layers=[2, 4, 6])
    assert {s for s, _ in pruned} <= {1, 3}
    assert (1, 2) in pruned and (3, 6) in pruned
    assert sorted(t for _, t in pruned) == [2, 4, 6]  # every teacher layer still gets a student layer


def test_dynamic_map_per_layer_projections_and_default_teacher_set(teacher_hidden: list[torch.Tensor]) -> None:
    # 6-layer teacher: default teacher set is [2, 3, 5, 6]
    student, proj = _plant(teacher_hidden, {1: 2, 2: 3, 3: 5, 4: 6}, width=20)
    per_layer = nn.ModuleDict({str(j): proj for j in range(1, 5)})
    assert dynamic_map(student, teacher_hidden, per_layer) == [(1, 2), (2, 3), (3, 5), (4, 6)]
    with pytest.raises(InputError, match="no projection for student layer 4"):
        dynamic_map(student, teacher_hidden, {1: proj, 2: proj, 3: proj})


def test_dynamic_map_same_width_without_projection(teacher_hidden: list[torch.Tensor]) -> None:
    student = [teacher_hidden[0], teacher_hidden[5] + 0.01, teacher_hidden[1] - 0.01]
    assert dynamic_map(student, teacher_hidden, None, teacher_layers=[1, 5]) == [(1, 5), (2, 1)]
    wide, _ = _plant(teacher_hidden, {1: 1, 2: 2}, width=24)
    with pytest.raises(InputError, match="pass a Linear projection"):
        dynamic_map(wide, teacher_hidden, None)
    with pytest.raises(InputError, match="teacher layer 9 is out of range"):
        dynamic_map(student, teacher_hidden, None, teacher_layers=[9])
    with pytest.raises(InputError, match="no unpruned student layer"):
        dynamic_map(student, teacher_hidden, None, student_layers=[])


def test_dynamic_map_ignores_padding(teacher_hidden: list[torch.Tensor]) -> None:
    """On valid tokens student layer 1 matches teacher layer 6; on padded tokens student layer 1 is
    garbage and student layer 2 copies teacher layer 6. Only the mask keeps the right answer."""
    t6 = teacher_hidden[6]
    mask = torch.ones(t6.shape[:2], dtype=torch.long)
    mask[:, 5:] = 0
    pad = mask == 0
    g = torch.Generator().manual_seed(3)
    s1 = t6 + 0.01 * torch.randn(t6.shape, generator=g)
    s1[pad] = 50 * torch.randn(s1[pad].shape, generator=g)
    s2 = teacher_hidden[2].clone()
    s2[pad] = t6[pad]
    student = [teacher_hidden[0], s1, s2]
    assert dynamic_map(student, teacher_hidden, None, teacher_layers=[6], attention_mask=mask) == [(1, 6)]
    assert dynamic_map(student, teacher_hidden, None, teacher_layers=[6]) == [(2, 6)]
