"""The family table: one `FamilySpec` per supported `config.model_type`, and the dispatch (`get_adapter`).

Paths are dotted, relative to the base model (`layers`, `embeddings`, `final_norm`) or to one layer (the rest);
where transformers moved a module between versions (ViT in 5.x), older layouts follow as further candidates.
Config attribute names come from optimum's `NormalizedConfigManager`; a spec's `config_fields` adds what optimum
does not normalise (FFN width, kv heads of MHA families, head_dim).
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from compress.errors import InputError
from compress.models.base import FAMILY_SPECS, LOGICAL_FIELDS, FamilySpec, ModelAdapter, register_family, supported_families

log = logging.getLogger(__name__)

# logical name -> optimum NormalizedConfig attribute holding the family's config attribute name
_OPTIMUM_KEYS = {
    "num_layers": "NUM_LAYERS",
    "num_heads": "NUM_ATTENTION_HEADS",
    "num_kv_heads": "NUM_KEY_VALUE_HEADS",
    "hidden_size": "HIDDEN_SIZE",
    "vocab_size": "VOCAB_SIZE",
}
# when neither the spec nor optimum names a field
_DEFAULT_NAMES: dict[str, str | None] = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": None,  # None: same attribute as num_heads (multi-head attention)
    "intermediate_size": "intermediate_size",
    "hidden_size": "hidden_size",
    "head_dim": None,  # None: derived as hidden_size // num_heads
    "vocab_size": "vocab_size",
}
_REQUIRED = ("num_layers", "num_heads", "hidden_size")


def _bert_like(family: str) -> FamilySpec:
    return FamilySpec(
        family=family,
        layers=("encoder.layer",),
        embeddings=("embeddings",),
        attn_module=("attention.self",),
        q=("attention.self.query",),
        k=("attention.self.key",),
        v=("attention.self.value",),
        o=("attention.output.dense",),
        ffn_module=("intermediate",),
        up=("intermediate.dense",),
        down=("output.dense",),
        act=("intermediate.intermediate_act_fn",),
        attn_norm=("attention.output.LayerNorm",),
        ffn_norm=("output.LayerNorm",),
        norm_position="post",
    )


def _llama_like(family: str) -> FamilySpec:
    return FamilySpec(
        family=family,
        layers=("layers",),
        embeddings=("embed_tokens",),
        attn_module=("self_attn",),
        q=("self_attn.q_proj",),
        k=("self_attn.k_proj",),
        v=("self_attn.v_proj",),
        o=("self_attn.o_proj",),
        ffn_module=("mlp",),
        up=("mlp.up_proj",),
        down=("mlp.down_proj",),
        gate=("mlp.gate_proj",),
        act=("mlp.act_fn",),
        attn_norm=("input_layernorm",),
        ffn_norm=("post_attention_layernorm",),
        norm_position="pre",
        final_norm=("norm",),
        causal=True,
        config_fields={"num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"},
    )


for _spec in (
    _bert_like("bert"),
    _bert_like("roberta"),
    FamilySpec(
        family="distilbert",
        layers=("transformer.layer",),
        embeddings=("embeddings",),
        attn_module=("attention",),
        q=("attention.q_lin",),
        k=("attention.k_lin",),
        v=("attention.v_lin",),
        o=("attention.out_lin",),
        ffn_module=("ffn",),
        up=("ffn.lin1",),
        down=("ffn.lin2",),
        act=("ffn.activation",),
        attn_norm=("sa_layer_norm",),
        ffn_norm=("output_layer_norm",),
        norm_position="post",
        config_fields={"intermediate_size": "hidden_dim"},
    ),
    FamilySpec(
        family="vit",
        layers=("layers", "encoder.layer"),
        embeddings=("embeddings",),
        attn_module=("attention",),
        q=("attention.q_proj", "attention.attention.query"),
        k=("attention.k_proj", "attention.attention.key"),
        v=("attention.v_proj", "attention.attention.value"),
        o=("attention.o_proj", "attention.output.dense"),
        ffn_module=("mlp", "intermediate"),
        up=("mlp.fc1", "intermediate.dense"),
        down=("mlp.fc2", "output.dense"),
        act=("mlp.activation_fn", "intermediate.intermediate_act_fn"),
        attn_norm=("layernorm_before",),
        ffn_norm=("layernorm_after",),
        norm_position="pre",
        final_norm=("layernorm",),
        hidden_states_end_normed=False,
        modality="image",
    ),
    FamilySpec(
        family="gpt2",
        layers=("h",),
        embeddings=("wte",),
        attn_module=("attn",),
        q=("attn.c_attn",),
        k=("attn.c_attn",),
        v=("attn.c_attn",),
        o=("attn.c_proj",),
        ffn_module=("mlp",),
        up=("mlp.c_fc",),
        down=("mlp.c_proj",),
        act=("mlp.act",),
        attn_norm=("ln_1",),
        ffn_norm=("ln_2",),
        norm_position="pre",
        final_norm=("ln_f",),
        fused_qkv=True,
        causal=True,
        config_fields={"intermediate_size": "n_inner"},
    ),
    _llama_like("llama"),
    _llama_like("qwen2"),
):
    register_family(_spec)


def _optimum_names(config: Any, model_type: str) -> dict[str, str]:
    try:
        from optimum.utils import NormalizedConfigManager

        normalized = NormalizedConfigManager.get_normalized_config_class(model_type)(config)
    except (ImportError, KeyError, AttributeError, TypeError) as err:
        log.debug("optimum has no NormalizedConfig for %s (%s); using the family table", model_type, err)
        return {}
    names: dict[str, str] = {}
    for logical, key in _OPTIMUM_KEYS.items():
        try:
            name = object.__getattribute__(normalized, key)
        except AttributeError:
            continue
        if isinstance(name, str) and "." not in name:
            names[logical] = name
    return names


def resolve_config_fields(config: Any, spec: FamilySpec) -> dict[str, str | None]:
    """Logical size name -> the config attribute actually stored (after the config's `attribute_map`), or None
    when the family has no such attribute (see the table in `compress.models.base`)."""
    from_optimum = _optimum_names(config, spec.family)
    attribute_map: dict[str, str] = dict(getattr(config, "attribute_map", {}) or {})
    fields: dict[str, str | None] = {}
    for logical in LOGICAL_FIELDS:
        explicit = logical in spec.config_fields
        name = spec.config_fields[logical] if explicit else from_optimum.get(logical, _DEFAULT_NAMES[logical])
        if name is not None:
            name = attribute_map.get(name, name)
            if not explicit and not hasattr(config, name):
                name = None
        fields[logical] = name
    if fields["num_kv_heads"] is None:
        fields["num_kv_heads"] = fields["num_heads"]
    missing = [f for f in _REQUIRED if fields[f] is None or getattr(config, fields[f], None) is None]
    if missing:
        raise InputError(
            f"model type '{spec.family}' is not supported by compress adapters: missing config fields "
            f"{', '.join(missing)} in {type(config).__name__}; supported: {', '.join(supported_families())}"
        )
    return fields


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The structural view of an HF model, chosen by `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type:
        raise InputError(
            f"model type '{type(model).__name__}' is not supported by compress adapters: missing config.model_type "
            f"(not a Hugging Face transformers model); supported: {', '.join(supported_families())}"
        )
    spec = FAMILY_SPECS.get(model_type)
    if spec is None:
        raise InputError(
            f"model type '{model_type}' is not supported by compress adapters: missing a family table "
            f"(layers, attention, FFN paths) in compress/models/families.py; "
            f"supported: {', '.join(supported_families())}"
        )
    return ModelAdapter(model, spec, resolve_config_fields(model.config, spec))
