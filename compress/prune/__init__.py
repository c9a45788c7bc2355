"""Structured pruning (docs/pruning.md). Public API, imported lazily (`import compress` loads
`compress.prune.reload` and must not import torch):

- `KeepPlan` (plan.py): what a decision keeps;
- `check_plan`, `layer_sizes`; `shrink(model, plan)` itself is `compress.prune.shrink.shrink` (the submodule
  `compress.prune.shrink` would shadow a package-level function of the same name);
- `MaskSet`, `apply_masks`, `plan_from_masks`, `fold_masks`, `materialize` (apply.py);
- `score_units`, `plan_at_ratio`, `plan_for_target`, `count_params`, `round_plan`, `Scores` (importance.py);
- `trim_vocab`, `trim_tokenizer`, `trim_model`, `kept_token_ids`, `save_trimmed` (vocab.py).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KeepPlan": "plan",
    "check_plan": "surgery", "layer_sizes": "surgery",
    "MaskSet": "apply", "apply_masks": "apply", "plan_from_masks": "apply", "fold_masks": "apply",
    "materialize": "apply",
    "score_units": "importance", "plan_at_ratio": "importance", "plan_for_target": "importance",
    "count_params": "importance", "round_plan": "importance", "Scores": "importance",
    "trim_vocab": "vocab", "trim_tokenizer": "vocab", "trim_model": "vocab", "kept_token_ids": "vocab", "save_trimmed": "vocab",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"compress.prune.{module}"), name)


__all__ = sorted(_EXPORTS)
