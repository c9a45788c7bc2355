"""What a pruning decision is: which units of a model to keep. Importance scores (one-shot) and learned
hard-concrete masks both end in a `KeepPlan`; `compress.prune.shrink` applies one physically. All indices
refer to the model the plan was made for (original layer numbers, original head / neuron / channel ids)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KeepPlan:
    """Units to keep. `None` (or a missing layer key) means "keep all" for that granularity.

    - layers: kept layer indices, increasing. A dropped layer disappears with its heads and FFN.
    - heads: per layer index, the kept query heads (increasing). For GQA models the kept key/value groups
      follow from the kept query heads (a group stays while any of its query heads stays; shrink checks
      that the result is a valid grouping). An empty list removes the whole attention sub-layer.
    - ffn: per layer index, the kept intermediate neurons (increasing). Empty removes the whole FFN.
    - hidden: kept hidden channels (increasing), applied to embeddings, every projection, the norms and
      the heads that read the hidden size.
    - vocab: kept token ids (increasing), for vocabulary trimming of encoders.
    """

    layers: list[int] | None = None
    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    hidden: list[int] | None = None
    vocab: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "heads": {str(k): v for k, v in sorted(self.heads.items())},
            "ffn": {str(k): v for k, v in sorted(self.ffn.items())},
            "hidden": self.hidden,
            "vocab": self.vocab,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeepPlan:
        return cls(
            layers=data.get("layers"),
            heads={int(k): list(v) for k, v in (data.get("heads") or {}).items()},
            ffn={int(k): list(v) for k, v in (data.get("ffn") or {}).items()},
            hidden=data.get("hidden"),
            vocab=data.get("vocab"),
        )
