"""What `compress passes` prints: each registered pass with its contract, version and config fields (the
pydantic `model_fields`: type, default, constraints, description). Nested config models are expanded into
dotted fields (`schedule.kind`) with the defaults their parent's default holds.

Plain text here, one pass per block, nothing cut: what a file, a pipe or `less` gets, and `compress passes
TYPE` on any output. The terminal listing (rich tables) is in compress/cli.py and reads `field_rows` too."""
from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from compress.errors import InputError

CONTRACT = ("consumes", "refuses", "produces", "drops")
_QUALIFIED = re.compile(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)")


@dataclass(frozen=True)
class FieldRow:
    name: str  # dotted for a field of a nested config model
    type: str
    default: str  # `required` when it has none
    constraints: str  # e.g. `gt=0, le=1`
    description: str


def type_name(annotation: Any) -> str:
    """A readable type: `int | None`, `'linear' | 'cosine' | 'constant'`, `list[str]`, `ScheduleConfig`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None and args:
        base = getattr(origin, "__name__", None) or _QUALIFIED.sub(r"\1", str(origin))
        return f"{base}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return _QUALIFIED.sub(r"\1", str(annotation).replace("typing.", ""))


def _constraints(metadata: list[Any]) -> str:
    out = []
    for m in metadata:
        for attr in ("gt", "ge", "lt", "le", "min_length", "max_length", "multiple_of"):
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{attr}={value}")
    return ", ".join(out)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (also through `X | None`), to expand its fields."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if inspect.isclass(c) and issubclass(c, BaseModel)), None)


def field_rows(model: type[BaseModel], prefix: str = "", defaults: Any = None) -> list[FieldRow]:
    """Every field of `model`, nested models expanded after their own row. `defaults` is the instance whose
    values are the defaults (a parent's default for a nested model)."""
    rows: list[FieldRow] = []
    for name, f in model.model_fields.items():
        if f.exclude:  # set by the loader, not by the YAML
            continue
        if defaults is not None:
            value, required = getattr(defaults, name, None), False
        elif f.is_required():
            value, required = PydanticUndefined, True
        else:
            value, required = f.get_default(call_default_factory=True), False
        nested = _model_class(f.annotation)
        shown = "required" if required else ("(see its fields)" if isinstance(value, BaseModel) else repr(value))
        rows.append(FieldRow(prefix + name, type_name(f.annotation), shown, _constraints(f.metadata),
                             " ".join((f.description or "").split())))
        if nested is not None:
            rows += field_rows(nested, f"{prefix}{name}.", value if isinstance(value, BaseModel) else None)
    return rows


def contract_lines(cls: type, full: bool = False) -> list[str]:
    """`consumes: a PyTorch student, a teacher` (full) or `consumes: torch_student, teacher`."""
    out = []
    for what in CONTRACT:
        kinds = getattr(cls, what, ()) or ()
        if kinds:
            out.append(f"{what}: " + ", ".join(k.value if full else k.name.lower() for k in kinds))
    return out


def _doc(cls: type) -> str:
    """The class's own docstring (not one inherited from Pass or PassConfig), dedented."""
    return inspect.cleandoc(cls.__dict__.get("__doc__") or "")


def summary(cls: type) -> str:
    doc = _doc(cls)
    return doc.splitlines()[0] if doc else ""


def describe(cls: type, full: bool = False) -> str:
    """One pass as plain text. `full`: the whole docstring (pass and config), the contract in words and the
    data splits it reads; else the docstring's first line and the short contract."""
    name = getattr(cls, "type", cls.__name__)
    lines = [f"{name} (version {getattr(cls, 'version', '?')})"]
    doc = _doc(cls)
    if full:
        lines += [f"  {line}" if line else "" for line in doc.splitlines()] or ["  (no description)"]
        config_doc = _doc(cls.Config)
        if config_doc and config_doc != doc:
            lines += ["", f"  config ({cls.Config.__name__}):"]
            lines += [f"    {line}" if line else "" for line in config_doc.splitlines()]
    elif summary(cls):
        lines.append(f"  {summary(cls)}")
    contract = contract_lines(cls, full)
    if full:
        lines += ["", *[f"  {line}" for line in contract]] if contract else ["", "  contract: none declared"]
        if getattr(cls, "uses_data", ()):
            lines.append(f"  reads data: {', '.join(cls.uses_data)}")
    elif contract:
        lines.append(f"  {'; '.join(contract)}")
    rows = field_rows(cls.Config)
    lines += ["", "  fields:" if rows else "  fields: none"]
    for r in rows:
        extra = f"  ({r.constraints})" if r.constraints else ""
        lines.append(f"    {r.name}: {r.type} = {r.default}{extra}" if r.default != "required"
                     else f"    {r.name}: {r.type} (required){extra}")
        if r.description:
            lines.append(f"        {r.description}")
    return "\n".join(lines) + "\n"


def find_pass(name: str) -> type:
    from compress.registry import all_passes

    passes = all_passes()
    if name not in passes:
        raise InputError(f"compress passes {name}: no such pass type; the known types are {', '.join(passes)}")
    return passes[name]
