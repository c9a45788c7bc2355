"""Layer maps for intermediate-layer distillation: which student layer learns from which teacher layer.

Layer indices are 1-based and follow Hugging Face's `output_hidden_states` convention: index 0 is the
embedding output, index j (1..M for the student, 1..L for the teacher) is the output of layer j. A map is a
list of `(student_layer, teacher_layer)` pairs, sorted by student layer then teacher layer.

Static strategies (DESIGN.md, Algorithms: Layer mapping):
- `last`: only the last layers, `[(M, L)]`.
- `uniform`: student layer i learns from teacher layer g(i) = ceil(i * L / M). With the ceiling the last
  student layer always meets the last teacher layer; when the student is deeper than the teacher
  (M > L) several student layers share a teacher layer.
- `uniform+last`: `uniform` with `(M, L)` added if missing. With the ceiling formula the pair is always
  there already, so this gives the same map as `uniform`; the name is kept so configs can say that the
  last pair is wanted whatever `uniform` becomes.
- `explicit`: the user's pairs, checked against the depths (0 = embeddings is allowed on both sides).
- `auto` (the default): identity when the depths match, else `uniform`.
- `dynamic` (CoFi): chosen during training from the hidden states with `dynamic_map`; as a static map
  (before the first step) it is the `auto` map.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from compress.errors import InputError

log = logging.getLogger(__name__)

Strategy = Literal["auto", "last", "uniform", "uniform+last", "explicit", "dynamic"]
STRATEGIES: tuple[str, ...] = ("auto", "last", "uniform", "uniform+last", "explicit", "dynamic")
Pair = tuple[int, int]

# how many teacher layers CoFi matches by default (layers 3, 6, 9, 12 of a 12-layer teacher)
DYNAMIC_TEACHER_POINTS = 4


class MappingConfig(BaseModel):
    """Which student layer is distilled from which teacher layer."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(
        "auto",
        description="auto: identity for equal depths, else uniform. last: only (M, L). uniform: student layer i "
        "<- teacher layer ceil(i*L/M). uniform+last: uniform, (M, L) guaranteed. explicit: the `pairs` given. "
        "dynamic: CoFi, each teacher layer in `teacher_layers` matched every step to the closest unpruned student layer.",
    )
    pairs: list[tuple[int, int]] | None = Field(
        None,
        description="For strategy 'explicit': (student_layer, teacher_layer) pairs, 1-based layer indices, "
        "0 = the embedding output.",
    )
    teacher_layers: list[int] | None = Field(
        None,
        description="For strategy 'dynamic': the teacher layers to match (1-based). Default: 4 evenly spaced "
        "layers ending at the last one (CoFi's 3, 6, 9, 12 for a 12-layer teacher).",
    )

    @model_validator(mode="after")
    def _check(self) -> MappingConfig:
        if self.strategy == "explicit" and not self.pairs:
            raise ValueError("strategy 'explicit' needs `pairs`, e.g. pairs: [[1, 4], [2, 8], [3, 12]]")
        if self.pairs is not None and self.strategy != "explicit":
            raise ValueError(f"`pairs` is only used with strategy 'explicit' (strategy is '{self.strategy}')")
        if self.teacher_layers is not None and self.strategy != "dynamic":
            raise ValueError(f"`teacher_layers` is only used with strategy 'dynamic' (strategy is '{self.strategy}')")
        return self

    def resolve(self, num_student: int, num_teacher: int) -> list[Pair]:
        """The static map for these depths (for 'dynamic': the starting map)."""
        return layer_map(num_student, num_teacher, self.strategy, self.pairs)


def _check_depths(num_student: int, num_teacher: int) -> None:
    for name, n in (("student", num_student), ("teacher", num_teacher)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"layer map: the {name} has {n!r} layers; it needs at least 1 transformer layer")


def _uniform(num_student: int, num_teacher: int) -> list[Pair]:
    # integer ceiling: ceil(i*L/M) without floating point
    return [(i, -(-i * num_teacher // num_student)) for i in range(1, num_student + 1)]


def auto_map(num_student: int, num_teacher: int) -> list[Pair]:
    """The default map: identity when the depths are equal, else `uniform` (which ends with (M, L))."""
    _check_depths(num_student, num_teacher)
    if num_student == num_teacher:
        return [(i, i) for i in range(1, num_student + 1)]
    return _uniform(num_student, num_teacher)


def layer_map(
    num_student: int, num_teacher: int, strategy: str = "auto", pairs: Sequence[Sequence[int]] | None = None
) -> list[Pair]:
    """Pairs (student_layer, teacher_layer) for a student of `num_student` layers and a teacher of
    `num_teacher` layers. See the module docstring for the strategies."""
    _check_depths(num_student, num_teacher)
    if strategy not in STRATEGIES:
        raise InputError(f"layer map: unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if strategy == "explicit":
        return _explicit(num_student, num_teacher, pairs)
    if pairs is not None:
        raise InputError(f"layer map: pairs are only used with strategy 'explicit' (strategy is '{strategy}')")
    if strategy == "last":
        return [(num_student, num_teacher)]
    if strategy == "uniform":
        return _uniform(num_student, num_teacher)
    if strategy == "uniform+last":
        out = _uniform(num_student, num_teacher)
        if (num_student, num_teacher) not in out:
            out.append((num_student, num_teacher))
        return sorted(out)
    if strategy == "dynamic":
        log.debug("layer map: 'dynamic' starts from the auto map; dynamic_map() re-matches during training")
    return auto_map(num_student, num_teacher)


def _explicit(num_student: int, num_teacher: int, pairs: Sequence[Sequence[int]] | None) -> list[Pair]:
    if not pairs:
        raise InputError("layer map: strategy 'explicit' needs pairs, e.g. pairs: [[1, 4], [2, 8], [3, 12]]")
    out: list[Pair] = []
    for k, pair in enumerate(pairs):
        try:
            s, t = pair
        except (TypeError, ValueError):
            raise InputError(
                f"layer map: pairs[{k}] = {pair!r} is not a (student_layer, teacher_layer) pair of two integers"
            ) from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, t)):
            raise InputError(f"layer map: pairs[{k}] = {pair!r}: layer indices must be integers")
        if not 0 <= s <= num_student:
            raise InputError(
                f"layer map: pairs[{k}] = ({s}, {t}): student layer {s} is out of range; "
                f"valid student layers are 0..{num_student} (0 = embeddings)"
            )
        if not 0 <= t <= num_teacher:
            raise InputError(
                f"layer map: pairs[{k}] = ({s}, {t}): teacher layer {t} is out of range; "
                f"valid teacher layers are 0..{num_teacher} (0 = embeddings)"
            )
        if (s, t) not in out:
            out.append((s, t))
    return sorted(out)


def default_dynamic_teacher_layers(num_teacher: int, points: int = DYNAMIC_TEACHER_POINTS) -> list[int]:
    """`points` evenly spaced teacher layers ending at the last: ceil(k*L/points), k = 1..points."""
    _check_depths(1, num_teacher)
    k = min(points, num_teacher)
    return sorted({t for _, t in _uniform(k, num_teacher)})


Projection = nn.Module | Callable[[Tensor], Tensor]


def _projection_for(projections: Mapping[int | str, Projection] | Projection | None, layer: int) -> Projection | None:
    if projections is None:
        return None
    if isinstance(projections, (Mapping, nn.ModuleDict)):
        for key in (layer, str(layer)):
            if key in projections:
                return projections[key]
        raise InputError(
            f"dynamic layer map: no projection for student layer {layer}; "
            f"give one per candidate layer (keys {sorted(map(str, projections.keys()))} were given)"
        )
    return projections


def layer_distances(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    projections: Mapping[int | str, Projection] | Projection | None,
    *,
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """MSE(W h_S^j, h_T^i) for every teacher layer i (rows) and student layer j (columns), averaged over
    the valid tokens (attention_mask [batch, seq] != 0) and the hidden size. No gradient flows."""
    rows = []
    with torch.no_grad():
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(dtype=torch.float32).unsqueeze(-1)  # [B, T, 1]
            if mask.sum() <= 0:
                raise InputError("dynamic layer map: the attention mask has no valid token")
        projected = []
        for j in student_layers:
            h = student_hidden[j]
            proj = _projection_for(projections, j)
            projected.append((proj(h) if proj is not None else h).float())
        for i in teacher_layers:
            t = teacher_hidden[i].float()
            row = []
            for j, h in zip(student_layers, projected):
                if h.shape != t.shape:
                    raise InputError(
                        f"dynamic layer map: student layer {j} gives shape {tuple(h.shape)} after projection but "
                        f"teacher layer {i} has {tuple(t.shape)}; pass a Linear projection when the widths differ"
                    )
                sq = (h - t).pow(2)
                if mask is not None:
                    row.append((sq * mask).sum() / (mask.sum() * t.shape[-1]))
                else:
                    row.append(sq.mean())
            rows.append(torch.stack(row))
    return torch.stack(rows)


def dynamic_map(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    projections: Mapping[int | str, Projection] | Projection | None,
    *,
    student_layers: Sequence[int] | None = None,
    teacher_layers: Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
) -> list[Pair]:
    """CoFi's dynamic map: for each teacher layer i in `teacher_layers`,
    m(i) = argmin_j MSE(W h_S^j, h_T^i) over the unpruned student layers j in `student_layers`.

    `student_hidden` / `teacher_hidden` are the `output_hidden_states` tuples (index 0 = embeddings, index j =
    layer j). `projections` is None (same widths), one module / callable W shared by all student layers, or a
    mapping from student layer (int or its string, as in an nn.ModuleDict) to its own W.
    `student_layers` defaults to every student layer 1..M; `teacher_layers` to `default_dynamic_teacher_layers`.
    Ties go to the lower student layer. Returns (student_layer, teacher_layer) pairs sorted by student layer.
    """
    num_student = len(student_hidden) - 1
    num_teacher = len(teacher_hidden) - 1
    if num_student < 1 or num_teacher < 1:
        raise InputError(
            "dynamic layer map: pass the full output_hidden_states (embeddings first, then one entry per layer); "
            f"got {len(student_hidden)} student and {len(teacher_hidden)} teacher entries"
        )
    s_layers = list(range(1, num_student + 1)) if student_layers is None else list(student_layers)
    t_layers = default_dynamic_teacher_layers(num_teacher) if teacher_layers is None else list(teacher_layers)
    if not s_layers:
        raise InputError("dynamic layer map: no unpruned student layer to match; keep at least one layer")
    if not t_layers:
        raise InputError("dynamic layer map: teacher_layers is empty; name at least one teacher layer")
    for j in s_layers:
        if not 0 <= j <= num_student:
            raise InputError(f"dynamic layer map: student layer {j} is out of range; valid are 0..{num_student}")
    for i in t_layers:
        if not 0 <= i <= num_teacher:
            raise InputError(f"dynamic layer map: teacher layer {i} is out of range; valid are 0..{num_teacher}")
    dist = layer_distances(
        student_hidden, teacher_hidden, projections,
        student_layers=s_layers, teacher_layers=t_layers, attention_mask=attention_mask,
    )
    pairs: list[Pair] = []
    for row, i in zip(dist, t_layers):
        # argmin returns the first minimum, i.e. the lower student layer on ties
        j = s_layers[int(torch.argmin(row))]
        if (j, i) not in pairs:
            pairs.append((j, i))
    log.debug("dynamic layer map: %s", pairs)
    return sorted(pairs)


def teacher_layers_needed(pairs: Sequence[Pair]) -> list[int]:
    """The distinct teacher layers a map reads (for hooking only what is needed)."""
    return sorted({t for _, t in pairs})

