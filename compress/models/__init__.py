"""Model adapters: one uniform structural view of each HF family (see `compress.models.base` for the
conventions and `compress.models.families` for the table). Loading and saving live in `compress.models.loading`."""
from __future__ import annotations

from compress.models.base import (
    AttentionView,
    Capture,
    FamilySpec,
    FFNView,
    LayerView,
    ModelAdapter,
    in_features,
    is_conv1d,
    out_features,
    proj_weight,
)
from compress.models.families import get_adapter, register_family, resolve_config_fields, supported_families

__all__ = [
    "AttentionView",
    "Capture",
    "FFNView",
    "FamilySpec",
    "LayerView",
    "ModelAdapter",
    "get_adapter",
    "in_features",
    "is_conv1d",
    "out_features",
    "proj_weight",
    "register_family",
    "resolve_config_fields",
    "supported_families",
]
