"""What the engine records about each pass of a run: the rows of report.json's `passes` (written by
compress.pipeline, read by compress.report.render; it lives here so that neither imports the other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRecord:
    label: str
    type: str
    version: str
    config: dict[str, Any]
    key: str = ""
    status: str = "pending"  # ran | cached | failed | skipped
    duration_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
