"""Weight inheritance (TinyCLIP-style): a smaller student made from the teacher's own weights instead of a
random init. Layers are dropped through the model adapter, so no family is special-cased here.

`keep_layers` / `student_from_teacher`: the teacher with some layers kept (distill's `student_layers`; also the
layer step of `compress.prune.shrink`). A searched shape is sliced from the teacher by `compress.search.student`
(which builds on compress.prune, so it lives apart from this module to keep imports acyclic)."""
from __future__ import annotations

import copy

from torch import nn

from compress.errors import InputError


def uniform_layers(num_teacher: int, num_student: int) -> list[int]:
    """0-based teacher layers a student of `num_student` layers keeps: the teacher side of the uniform
    layer map (student layer i takes teacher layer ceil(i*L/M)), so every k-th and always the last."""
    from compress.distill.mapping import layer_map

    if not 0 < num_student <= num_teacher:
        raise InputError(f"student layers: {num_student} must be between 1 and the teacher's {num_teacher}")
    return [t - 1 for _, t in layer_map(num_student, num_teacher, "uniform")]


def _layer_container(model: nn.Module, layers: list[nn.Module]) -> tuple[nn.Module, str]:
    first = layers[0]
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == len(layers) and child[0] is first:
                return parent, name
    raise InputError(f"cannot find the layer list of {type(model).__name__}; layer inheritance needs an nn.ModuleList of layers")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of `model` with only the layers `keep` (0-based, in order); the config is rewritten so the
    result saves and reloads with `from_pretrained`."""
    from compress.models import get_adapter

    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    layer_modules = [lv.module for lv in adapter.layers]
    if not keep or any(not 0 <= k < len(layer_modules) for k in keep) or sorted(set(keep)) != list(keep):
        raise InputError(f"layers to keep {keep}: must be increasing indices in 0..{len(layer_modules) - 1}")
    parent, name = _layer_container(model, layer_modules)
    kept = nn.ModuleList([layer_modules[k] for k in keep])
    setattr(parent, name, kept)
    for new_idx, layer in enumerate(kept):  # decoder layers carry their index for the KV cache
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx
    cfg = model.config
    setattr(cfg, adapter.config_fields["num_layers"], len(keep))
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layer_modules):
        cfg.layer_types = [layer_types[k] for k in keep]
    return model


def student_from_teacher(teacher: nn.Module, num_layers: int) -> tuple[nn.Module, list[int]]:
    """The teacher with `num_layers` uniformly chosen layers kept, and which ones they were."""
    from compress.models import get_adapter

    keep = uniform_layers(get_adapter(teacher).num_layers, num_layers)
    return keep_layers(teacher, keep), keep
