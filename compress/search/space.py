"""The search space of student shapes, per model family: depth, hidden size, query heads, key/value heads, FFN
width and whether the vocabulary is trimmed to the tokens the training data uses. Every student is a slice of
the teacher (`compress.search.inherit` builds it with `compress.prune.shrink`), so each value is bounded by the
teacher's and a head keeps the teacher's head size.

`SpaceConfig` holds the ranges as the config gives them (a list of values, or None: the teacher's value only);
`Space.from_config` checks them against the teacher's family and raises `InputError` (exit 2, one line) for an
empty space or inconsistent ranges: a value above the teacher's, heads that do not divide the hidden size, key/value
heads that do not divide the query heads, key/value heads on a family without grouped-query attention."""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from compress.errors import InputError

DIMENSIONS = ("layers", "hidden", "heads", "kv_heads", "ffn", "trim_vocab")


class SpaceConfig(BaseModel):
    """Allowed values of each dimension (None: the teacher's value only)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = Field(None, description="Numbers of transformer layers to try (<= the teacher's).")
    hidden: list[int] | None = Field(None, description="Hidden sizes (<= the teacher's; every value divisible by every heads value).")
    heads: list[int] | None = Field(None, description="Query heads per layer (<= the teacher's; each head keeps the teacher's head size).")
    kv_heads: list[int] | None = Field(None, description="Key/value heads per layer, for grouped-query families (LLaMA, Qwen2); each must divide every heads value.")
    ffn: list[int] | None = Field(None, description="FFN (intermediate) widths (<= the teacher's).")
    trim_vocab: list[bool] | None = Field(None, description="Whether the vocabulary is trimmed to the tokens of the training data "
                                          "([false], [true] or [false, true]; encoders with a WordPiece tokenizer).")


@dataclass(frozen=True, order=True)
class Candidate:
    """One student shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    trim_vocab: bool = False

    def key(self) -> str:
        return (f"L{self.layers}-H{self.hidden}-A{self.heads}-KV{self.kv_heads}-F{self.ffn}"
                + ("-vocab" if self.trim_vocab else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(**{k: data[k] for k in DIMENSIONS if k in data})


@dataclass(frozen=True)
class TeacherShape:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    head_dim: int
    grouped: bool  # the family has separate key/value heads (GQA)

    @classmethod
    def of(cls, model: Any) -> TeacherShape:
        from compress.models import get_adapter

        a = get_adapter(model)
        grouped = a.config_fields.get("num_kv_heads") not in (None, a.config_fields.get("num_heads"))
        return cls(family=a.family, layers=a.num_layers, hidden=a.hidden_size, heads=a.num_heads,
                   kv_heads=a.num_kv_heads, ffn=a.intermediate_size, head_dim=a.head_dim, grouped=grouped)

    def candidate(self) -> Candidate:
        return Candidate(self.layers, self.hidden, self.heads, self.kv_heads, self.ffn, False)


class Space:
    """The checked values of each dimension; `sample` and `mutate` draw from a `random.Random`."""

    def __init__(self, values: dict[str, tuple[Any, ...]], teacher: TeacherShape):
        self.values, self.teacher = values, teacher

    @classmethod
    def from_config(cls, cfg: SpaceConfig, teacher: TeacherShape, where: str = "search.space") -> Space:
        t = teacher
        tv = {"layers": t.layers, "hidden": t.hidden, "heads": t.heads, "kv_heads": t.kv_heads, "ffn": t.ffn,
              "trim_vocab": False}
        values: dict[str, tuple[Any, ...]] = {}
        for dim in DIMENSIONS:
            given = getattr(cfg, dim)
            if given is not None and len(given) == 0:
                raise InputError(f"{where}.{dim}: the list is empty, so the space is empty; give at least one value "
                                 f"(the teacher has {tv[dim]})")
            vals = tuple(sorted(set(given))) if given is not None else (tv[dim],)
            if dim != "trim_vocab":
                bad = [v for v in vals if not 0 < v <= tv[dim]]
                if bad:
                    raise InputError(f"{where}.{dim}: {bad[0]} is outside 1..{tv[dim]} (the teacher's {t.family} "
                                     f"model has {tv[dim]}); a student is a slice of the teacher")
            values[dim] = vals
        if cfg.kv_heads is not None and not t.grouped:
            raise InputError(f"{where}.kv_heads: the {t.family} family has no separate key/value heads (they are the "
                             "query heads); remove kv_heads")
        if not t.grouped:
            values["kv_heads"] = (0,)  # tied to heads: Candidate.kv_heads is filled with heads
        for h in values["hidden"]:
            for a in values["heads"]:
                if h % a:
                    raise InputError(f"{where}: hidden {h} is not divisible by heads {a} (a {t.family} model needs "
                                     "hidden % heads == 0); drop one of them from the ranges")
        if t.grouped:
            for a in values["heads"]:
                for kv in values["kv_heads"]:
                    if a % kv:
                        raise InputError(f"{where}: heads {a} is not a multiple of kv_heads {kv} (each key/value "
                                         "head serves the same number of query heads); drop one of them")
            group = t.heads // t.kv_heads
            for a in values["heads"]:
                for kv in values["kv_heads"]:
                    if a // kv > group:
                        raise InputError(f"{where}: heads {a} with kv_heads {kv} puts {a // kv} query heads on a "
                                         f"key/value head, more than the teacher's {group}; inheritance cannot slice "
                                         "that: raise kv_heads or lower heads")
        space = cls(values, teacher)
        if space.size == 0:
            raise InputError(f"{where}: the space is empty")
        return space

    @property
    def size(self) -> int:
        n = 1
        for v in self.values.values():
            n *= len(v)
        return n

    def varying(self) -> list[str]:
        return [d for d in DIMENSIONS if len(self.values[d]) > 1]

    def _make(self, d: dict[str, Any]) -> Candidate:
        if not self.teacher.grouped:
            d = {**d, "kv_heads": d["heads"]}
        return Candidate(**d)

    def all(self) -> list[Candidate]:
        return [self._make(dict(zip(DIMENSIONS, combo))) for combo in itertools.product(*(self.values[d] for d in DIMENSIONS))]

    def sample(self, rng: random.Random) -> Candidate:
        return self._make({d: rng.choice(self.values[d]) for d in DIMENSIONS})

    def mutate(self, cand: Candidate, rng: random.Random) -> Candidate:
        """`cand` with one dimension changed to another allowed value (itself when nothing varies)."""
        dims = self.varying()
        if not dims:
            return cand
        dim = rng.choice(dims)
        d = cand.to_dict()
        if not self.teacher.grouped:
            d["kv_heads"] = 0
        d[dim] = rng.choice([v for v in self.values[dim] if v != d[dim]])
        return self._make(d)

    def describe(self) -> dict[str, list[Any]]:
        return {d: list(v) for d, v in self.values.items() if not (d == "kv_heads" and not self.teacher.grouped)}
