"""Data: where a split comes from (DataSpec), reading it into Records (sources), and batching it (collate)."""
from __future__ import annotations

from compress.data.sources import Records, label_mapping, load_records
from compress.data.spec import DataSpec

__all__ = ["DataSpec", "Records", "label_mapping", "load_records"]
