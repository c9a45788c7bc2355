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
from typing import Any

ARTIFACT_FILE = "artifact.json"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    task: str
    model_dir: Path | None = None
    teacher_dir: Path | None = None
    onnx: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def replace(self, **changes: Any) -> Artifact:
        """A new artifact with `changes`; containers are copied so the old one stays untouched."""
        base = dict(
            onnx=dict(self.onnx),
            metrics={k: dict(v) for k, v in self.metrics.items()},
            history=list(self.history),
            extra=dict(self.extra),
        )
        base.update(changes)
        return dataclasses.replace(self, **base)

    def final_onnx(self) -> tuple[str, Path] | None:
        """The student that ships: the primary int8 model when there is one, else fp32."""
        for variant in ("int8", "fp32"):
            if variant in self.onnx:
                return variant, self.onnx[variant]
        return None

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
            "onnx": {k: rel(v) for k, v in self.onnx.items()},
            "metrics": self.metrics,
            "history": self.history,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], cache_root: Path) -> Artifact:
        def path(s: str | None) -> Path | None:
            if s is None:
                return None
            return cache_root / s[len("cache:") :] if s.startswith("cache:") else Path(s)

        return cls(
            task=data["task"],
            key=data.get("key", ""),
            model_dir=path(data.get("model_dir")),
            teacher_dir=path(data.get("teacher_dir")),
            onnx={k: path(v) for k, v in data.get("onnx", {}).items()},  # type: ignore[misc]
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
        if data.get("format") != FORMAT_VERSION:
            return None
        art = cls.from_json(data, cache_root)
        paths = [art.model_dir, art.teacher_dir, *art.onnx.values()]
        if any(p is not None and not Path(p).exists() for p in paths):
            return None
        return art
