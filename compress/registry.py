"""Pass registry. Built-in passes register with `@register`; third-party passes through the
entry-point group `compress.passes` (each entry point names a Pass subclass)."""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

# The registry holds pass classes (subclasses of compress.passes.base.Pass) by their `type` name and needs
# nothing else of them: it stays a leaf module, so config, pipeline and the passes import it without a cycle.
PassClass = type

log = logging.getLogger(__name__)

_PASSES: dict[str, PassClass] = {}
_loaded = False

BUILTIN_MODULES = (
    "compress.passes.finetune",
    "compress.passes.export",
    "compress.passes.ptq",
    "compress.passes.evaluate",
    "compress.passes.distill",
    "compress.passes.prune",
    "compress.passes.qat",
    "compress.passes.search",
)
ENTRY_POINT_GROUP = "compress.passes"


def register(cls: PassClass) -> PassClass:
    """Class decorator: make a Pass available under its `type` name."""
    name = getattr(cls, "type", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `type` (the name used in model.yaml)")
    if name in _PASSES and _PASSES[name] is not cls:
        log.warning("pass type '%s' re-registered by %s.%s", name, cls.__module__, cls.__name__)
    _PASSES[name] = cls
    return cls


def unregister(name: str) -> None:
    _PASSES.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # a built-in pass whose optional dependency is missing
            if err.name and err.name.startswith("compress."):
                raise
            log.debug("built-in pass module %s not loaded: %s", mod, err)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(ep.load())
        except Exception as err:  # a broken plug-in must not break the others
            log.warning("could not load pass plug-in '%s' (%s): %s", ep.name, ep.value, err)


def get_pass(name: str) -> PassClass:
    _load()
    return _PASSES[name]


def available_types() -> list[str]:
    _load()
    return sorted(_PASSES)


def all_passes() -> dict[str, PassClass]:
    _load()
    return dict(sorted(_PASSES.items()))
