"""The Artifact: what flows between passes (DESIGN.md, Data flow).

An artifact is a folder in the cache holding `artifact.json`; the files it names (the student's HF folder,
the teacher's, ONNX files) live in that folder or in earlier, immutable cache entries. Paths are stored
relative to the cache root so a cache can be moved as a whole."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

ARTIFACT_FILE = "artifact.json"
FORMAT_VERSION = 2  # 2: typed model files and evaluation (1: ONNX paths keyed "fp32"/"int8"/"int8-<method>")

Format = Literal["onnx"]
Precision = Literal["fp32", "int8", "int4"]
# how a model file was made: exported as is, or quantized dynamically, statically (calibrated QDQ), by
# quantization-aware training (QDQ), or weights only (activations stay float)
Method = Literal["export", "dynamic", "static", "qat", "weight-only"]
QDQ_METHODS = ("static", "qat")  # methods whose graph holds QuantizeLinear/DequantizeLinear pairs


@dataclass(frozen=True)
class ModelFile:
    """One model file an artifact holds: its format, precision, how it was made, where it is, and whether it is
    the quantized model that ships (`student.<precision>.onnx`)."""

    path: Path
    precision: Precision = "fp32"
    method: Method = "export"
    format: Format = "onnx"
    shipped: bool = False

    @property
    def name(self) -> str:
        """How reports name it: `fp32`, `int8-dynamic`, `int8-static`, `int8-qat`, `int4-weight-only`."""
        return self.precision if self.method == "export" else f"{self.precision}-{self.method}"

    @property
    def quantized(self) -> bool:
        return self.precision != "fp32"

    @property
    def holds_qdq(self) -> bool:
        return self.method in QDQ_METHODS

    def to_json(self, rel: Callable[[Path], str | None]) -> dict[str, Any]:
        return {"path": rel(self.path), "format": self.format, "precision": self.precision, "method": self.method,
                "shipped": self.shipped}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Callable[[str], Path]) -> ModelFile:
        return cls(path=path(data["path"]), format=data.get("format", "onnx"), precision=data["precision"],
                   method=data["method"], shipped=bool(data.get("shipped", False)))


@dataclass
class Evaluation:
    """What `evaluate` measured: the teacher in PyTorch, each model file (by `ModelFile.name`) in ONNX Runtime and
    the teacher's own ONNX Runtime baselines."""

    main_metric: str
    higher_is_better: bool
    examples: int
    teacher: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the teacher in ONNX Runtime (compress.onnx.baselines), by name: `teacher-fp32`, `teacher-int8-dynamic`...
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evaluation:
        return cls(**data)

    def report(self, shipped: ModelFile | None) -> dict[str, Any]:
        """The `evaluation` section of report.json: the models as `variants`, plus the shipped quantized model
        once more under its precision (`int8`) with `alias_of`."""
        variants = {name: dict(stats) for name, stats in self.models.items()}
        if shipped is not None and shipped.quantized and shipped.name in variants:
            variants[shipped.precision] = dict(variants[shipped.name], alias_of=shipped.name)
        return {"main_metric": self.main_metric, "higher_is_better": self.higher_is_better,
                "examples": self.examples, "teacher": self.teacher, "variants": variants,
                "baselines": {name: dict(stats) for name, stats in self.baselines.items()}}


@dataclass
class Artifact:
    task: str
    model_dir: Path | None = None
    teacher_dir: Path | None = None
    models: list[ModelFile] = field(default_factory=list)
    evaluation: Evaluation | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # for third-party passes; built-in passes use typed fields
    key: str = ""

    def replace(self, **changes: Any) -> Artifact:
        """A new artifact with `changes`; containers are copied so the old one stays untouched."""
        base = dict(
            models=list(self.models),
            metrics={k: dict(v) for k, v in self.metrics.items()},
            history=list(self.history),
            extra=dict(self.extra),
        )
        base.update(changes)
        return dataclasses.replace(self, **base)

    # ------------------------------------------------------------------ model files
    def find(self, *, precision: str | None = None, method: str | None = None) -> list[ModelFile]:
        return [m for m in self.models if (precision is None or m.precision == precision)
                and (method is None or m.method == method)]

    def fp32_onnx(self) -> ModelFile | None:
        """The float ONNX model quantizers start from."""
        return next(iter(self.find(precision="fp32")), None)

    def shipped(self) -> ModelFile | None:
        """The student that ships: the shipped quantized model when there is one, else fp32."""
        return next((m for m in self.models if m.shipped), None) or self.fp32_onnx()

    def shipped_name(self) -> str | None:
        """The shipped model as reports and gates name it: its precision (`int8`, `fp32`)."""
        m = self.shipped()
        return None if m is None else m.precision

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self, cache_root: Path) -> dict[str, Any]:
        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            p = Path(p).resolve()
            try:
                return "cache:" + str(p.relative_to(cache_root.resolve()))
            except ValueError:
                return str(p)

        return {
            "format": FORMAT_VERSION,
            "task": self.task,
            "key": self.key,
            "model_dir": rel(self.model_dir),
            "teacher_dir": rel(self.teacher_dir),
            "models": [m.to_json(rel) for m in self.models],
            "evaluation": self.evaluation.to_json() if self.evaluation else None,
            "metrics": self.metrics,
            "history": self.history,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], cache_root: Path) -> Artifact:
        def path(s: str) -> Path:
            return cache_root / s[len("cache:") :] if s.startswith("cache:") else Path(s)

        data = _upgrade(data)
        return cls(
            task=data["task"],
            key=data.get("key", ""),
            model_dir=path(data["model_dir"]) if data.get("model_dir") else None,
            teacher_dir=path(data["teacher_dir"]) if data.get("teacher_dir") else None,
            models=[ModelFile.from_json(m, path) for m in data.get("models", [])],
            evaluation=Evaluation.from_json(data["evaluation"]) if data.get("evaluation") else None,
            metrics=data.get("metrics", {}),
            history=data.get("history", []),
            extra=data.get("extra", {}),
        )

    def save(self, folder: Path, cache_root: Path) -> None:
        tmp = folder / (ARTIFACT_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(cache_root), indent=2, default=str))
        os.replace(tmp, folder / ARTIFACT_FILE)

    @classmethod
    def load(cls, folder: Path, cache_root: Path) -> Artifact | None:
        """The artifact in `folder`, or None when it is missing, unreadable or names files that are gone."""
        f = folder / ARTIFACT_FILE
        if not f.is_file():
            return None
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("format") not in (1, FORMAT_VERSION):
            return None
        art = cls.from_json(data, cache_root)
        paths = [art.model_dir, art.teacher_dir, *(m.path for m in art.models)]
        if any(p is not None and not Path(p).exists() for p in paths):
            return None
        return art


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """An artifact.json of format 1 in today's shape: ONNX paths keyed "fp32" / "int8-<method>" (with "int8"
    naming the shipped one) become model-file records; extra["evaluation"] becomes the evaluation."""
    if data.get("format", FORMAT_VERSION) != 1:
        return data
    data = dict(data)
    onnx: dict[str, str] = data.pop("onnx", {}) or {}
    models = []
    for key, p in onnx.items():
        if key == "int8":
            continue
        precision, _, method = key.partition("-")
        models.append({"path": p, "precision": precision, "method": method or "export",
                       "shipped": key != "fp32" and onnx.get("int8") == p})
    data["models"] = models
    extra = dict(data.get("extra") or {})
    old = extra.pop("evaluation", None)
    if old:
        variants = {k: v for k, v in old.get("variants", {}).items() if "alias_of" not in v}
        data["evaluation"] = {"main_metric": old["main_metric"], "higher_is_better": old["higher_is_better"],
                              "examples": old.get("examples", 0), "teacher": old.get("teacher", {}),
                              "models": variants}
    data["extra"] = extra
    return data
