"""Writing a matplotlib figure atomically: the one save step of every plot (report, pruning, search, OPTIMA
schedule, benchmarks). A leaf module, importable from any plotting module without an import cycle."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Write a matplotlib figure to `path` as PNG, atomically: a temp file beside it, then a rename; a failed write
    leaves no temp file behind. The caller closes the figure. One place for every plot of a run folder or benchmark."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", **savefig)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
