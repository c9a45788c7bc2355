"""Pruned model types that transformers' Auto classes can load: `compress_pruned_<family>`.

A pruned model whose sizes the plain family config cannot say (heads or FFN widths that differ between layers,
a removed attention or FFN sub-layer, or a BERT-style head size that is no longer hidden / heads) is saved with
`model_type = "compress_pruned_<family>"` and a `compress_pruning` entry in its config:

    {"family": "bert", "head_dim": 32, "heads": [4, 2, 0], "kv_heads": [4, 2, 0], "ffn": [64, 37, 64]}

The registered config class is a subclass of the family's config class (same fields, plus `head_dim` and
`compress_pruning`); each registered model class is a subclass of the family's model class that first builds
an unpruned skeleton large enough for every layer and then shrinks it in place with `shrink_in_place` to the
stored sizes, so `from_pretrained` finds parameters of the saved shapes. `register()` is called by
`import compress`; after it, `AutoModelFor...from_pretrained(folder)` works as for any model.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing torch here would make `import compress` slow
    from torch import nn

log = logging.getLogger(__name__)

PREFIX = "compress_pruned_"
# the Auto classes a pruned type is registered with (those the compress tasks use, plus base and masked LM)
AUTO_CLASSES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}
_CONFIGS: dict[str, type] = {}  # family -> pruned config class
_MODELS: dict[type, type] = {}  # family model class -> pruned model class
_REGISTERED: set[str] = set()
_MODELS_REGISTERED: set[str] = set()
_AUTO_MODULE = "transformers.models.auto.configuration_auto"


def pruned_type(family: str) -> str:
    return PREFIX + family


def is_pruned_type(config: Any) -> bool:
    return str(getattr(config, "model_type", "")).startswith(PREFIX)


def base_family(config: Any) -> str:
    model_type = str(getattr(config, "model_type", ""))
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def _config_class(family: str) -> type:
    if family not in _CONFIGS:
        from transformers import CONFIG_MAPPING

        base = CONFIG_MAPPING[family]

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, **kwargs)
            register_models(family)  # the model classes, the first time a config of this type is made

        _CONFIGS[family] = type(f"CompressPruned{base.__name__}", (base,), {
            "model_type": pruned_type(family), "__init__": __init__, "__module__": __name__})
    return _CONFIGS[family]


def _model_class(base: type, family: str) -> type:
    if base not in _MODELS:
        cls = type(f"CompressPruned{base.__name__}", (base,), {
            "config_class": _config_class(family),
            "__init__": _pruned_init(base),
            "__module__": __name__,
        })
        _MODELS[base] = cls
    return _MODELS[base]


def _register_family_spec(family: str) -> None:
    """The adapter of a pruned type is its family's, with the head size read from `config.head_dim`."""
    import dataclasses

    from compress.models.base import FAMILY_SPECS, register_family

    name = pruned_type(family)
    if name not in FAMILY_SPECS and family in FAMILY_SPECS:
        spec = FAMILY_SPECS[family]
        register_family(dataclasses.replace(spec, family=name, config_fields={**spec.config_fields,
                                                                             "head_dim": "head_dim"}))


def _families(families: list[str] | None) -> list[str]:
    from compress.models import supported_families

    return families or [f for f in supported_families() if not f.startswith(PREFIX)]


def register(families: list[str] | None = None) -> None:
    """Register `compress_pruned_<family>` with AutoConfig for every family the adapters support (or
    `families`); the model classes follow when a config of that type is first made (`register_models`).
    Idempotent. `import compress` arranges for this to run once transformers' auto module is loaded."""
    import transformers

    for family in _families(families):
        if family in _REGISTERED:
            continue
        _register_family_spec(family)
        transformers.AutoConfig.register(pruned_type(family), _config_class(family), exist_ok=True)
        _REGISTERED.add(family)


def register_models(family: str) -> None:
    """Register the pruned model classes of `family` with the Auto model classes (imports the family's
    modeling module). Idempotent."""
    import transformers
    from transformers.models.auto import modeling_auto

    if family in _MODELS_REGISTERED:
        return
    _MODELS_REGISTERED.add(family)
    cfg_cls = _config_class(family)
    for auto_name, mapping_name in AUTO_CLASSES.items():
        class_name = getattr(modeling_auto, mapping_name).get(family)
        base = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if base is not None:
            getattr(transformers, auto_name).register(cfg_cls, _model_class(base, family), exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` once, right after module `name` has been executed (a one-shot import hook)."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original, callback = loader.exec_module, self.callback

        def exec_module(module: Any) -> None:
            original(module)
            try:
                callback()
            except Exception as err:  # noqa: BLE001 - never break the user's transformers import
                log.warning("compress could not register its pruned model types: %s", err)

        loader.exec_module = exec_module
        return spec


class _LazyConfig:
    """Stands in the AutoConfig table for a pruned config class until it is first used: building the real
    class imports the family's configuration module, which must not happen inside transformers' own import."""

    def __init__(self, family: str, base_name: str):
        self.family = family
        self.__name__ = f"CompressPruned{base_name}"  # transformers matches extra configs by class name

    def _real(self) -> type:
        register([self.family])  # replaces this placeholder in the table by the real class
        return _config_class(self.family)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._real(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)


def _register_placeholders() -> None:
    module = sys.modules[_AUTO_MODULE]
    mapping, names = module.CONFIG_MAPPING, module.CONFIG_MAPPING_NAMES
    for family in ("bert", "roberta", "distilbert", "vit", "gpt2", "llama", "qwen2"):
        if pruned_type(family) not in mapping and family in names:
            mapping.register(pruned_type(family), _LazyConfig(family, names[family]), exist_ok=True)


def register_when_transformers_loads() -> None:
    """Make the pruned types loadable as soon as transformers' AutoConfig module is loaded (placeholders that
    build the real classes on first use), without importing transformers: `import compress` calls this."""
    if _AUTO_MODULE in sys.modules:
        _register_placeholders()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_AUTO_MODULE, _register_placeholders))


# ---------------------------------------------------------------------------------------------------- skeleton


def skeleton(config: Any, fields: dict[str, str | None]) -> tuple[dict[str, Any], Any]:
    """(config attribute -> value to build an unpruned model that holds every layer, the KeepPlan that shrinks
    that model to the stored per-layer sizes)."""
    from compress.prune.plan import KeepPlan

    layout = config.compress_pruning
    hd, hidden = int(layout["head_dim"]), int(getattr(config, fields["hidden_size"]))
    heads, kvs, ffns = layout["heads"], layout["kv_heads"], layout["ffn"]
    kv_b = max(1, max(kvs))
    group = max(1, max((h // kv for h, kv in zip(heads, kvs) if kv), default=1))
    if fields["num_kv_heads"] == fields["num_heads"]:  # multi-head attention: one head per group
        group = 1
        kv_b = max(1, max(heads))
    n_b = kv_b * group
    build: dict[str, Any] = {}
    if _family_has_head_dim(config):
        build[fields["hidden_size"]] = hidden
    else:  # head size = hidden / heads: enough heads of head_dim to cover the hidden size
        n_b = max(n_b, -(-hidden // hd))
        kv_b = n_b
        build[fields["hidden_size"]] = n_b * hd
    build[fields["num_heads"]] = n_b
    if fields["num_kv_heads"] != fields["num_heads"]:
        build[fields["num_kv_heads"]] = kv_b
    build[fields["intermediate_size"]] = max(1, max(ffns))
    build["head_dim"] = hd
    plan = KeepPlan(
        heads={i: [g * group + t for g in range(kv) for t in range(h // kv if kv else 0)]
               for i, (h, kv) in enumerate(zip(heads, kvs))},
        ffn={i: list(range(f)) for i, f in enumerate(ffns)},
        hidden=list(range(hidden)) if build[fields["hidden_size"]] != hidden else None,
    )
    return build, plan


def _family_has_head_dim(config: Any) -> bool:
    from compress.models.base import FAMILY_SPECS

    spec = FAMILY_SPECS.get(base_family(config))
    return spec is not None and spec.config_fields.get("head_dim") is not None


def _pruned_init(base: type) -> Any:
    def __init__(self: "nn.Module", config: Any, *args: Any, **kwargs: Any) -> None:
        """Build the family's model at the skeleton sizes, then shrink it in place to the stored sizes."""
        import torch

        from compress.models.base import FAMILY_SPECS
        from compress.models.families import resolve_config_fields
        from compress.prune.surgery import shrink_in_place

        _register_family_spec(base_family(config))
        fields = resolve_config_fields(config, FAMILY_SPECS[config.model_type])
        build, plan = skeleton(config, fields)
        saved = {k: getattr(config, k, None) for k in build}
        for k, v in build.items():
            setattr(config, k, v)
        try:
            base.__init__(self, config, *args, **kwargs)
            with torch.no_grad():
                shrink_in_place(self, plan)
        finally:
            for k, v in saved.items():
                setattr(config, k, v)

    return __init__


# ---------------------------------------------------------------------------------------------------- convert


def to_pruned_type(model: "nn.Module", sizes: list[dict[str, int]], *, head_dim: int, hidden: int) -> None:
    """Turn a shrunk model (its config still the family's) into its compress pruned type, in place: the config
    object and the model change class (subclasses of theirs), the per-layer sizes go into the config."""
    from compress.models import get_adapter

    config = model.config
    family = base_family(config)
    register([family])
    register_models(family)
    fields = get_adapter(model).config_fields
    base_cls = type(model)
    if base_cls in _MODELS.values():
        base_cls = base_cls.__mro__[1]
    config.__class__ = _config_class(family)
    # a config read from a folder carries `model_type` in its instance dict too ("bert"), which would shadow the
    # pruned class's and send the adapters back to the plain family (head size read as hidden / heads)
    config.__dict__.pop("model_type", None)
    model.__class__ = _model_class(base_cls, family)
    setattr(config, fields["hidden_size"], hidden)
    setattr(config, fields["num_heads"], max(1, max(s["heads"] for s in sizes)))
    if fields["num_kv_heads"] != fields["num_heads"]:
        setattr(config, fields["num_kv_heads"], max(1, max(s["kv_heads"] for s in sizes)))
    setattr(config, fields["intermediate_size"], max(1, max(s["ffn"] for s in sizes)))
    config.head_dim = head_dim
    config.compress_pruning = {
        "family": family, "head_dim": head_dim,
        "heads": [s["heads"] for s in sizes], "kv_heads": [s["kv_heads"] for s in sizes],
        "ffn": [s["ffn"] for s in sizes],
    }
    config.architectures = [base_cls.__name__]
    log.info("pruned sizes differ between layers or are not expressible in a %s config: saved as %s "
             "(load it after `import compress`)", family, pruned_type(family))
