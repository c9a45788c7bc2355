"""The report's pruning plot: per layer, the attention heads and the FFN width kept against the input model's
(a removed sub-layer shows as 0), with hidden size, vocabulary and parameters in the title."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_kept(metrics: dict[str, Any], path: Path, title: str = "pruning: kept per layer") -> Path:
    """Write the plot of a prune pass's metrics (`kept_per_layer`, `layers_before`, `kept_layers`, sizes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.report.figures import save_figure

    before = metrics.get("layers_before") or []
    kept = metrics["kept_per_layer"]
    layers = metrics.get("kept_layers") or list(range(len(kept)))
    n = len(before) or len(kept)
    heads = [0] * n
    ffn = [0] * n
    for orig, sizes in zip(layers, kept):
        heads[orig], ffn[orig] = sizes["heads"], sizes["ffn"]
    x = list(range(n))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, values, key, label in ((axes[0], heads, "heads", "attention heads"), (axes[1], ffn, "ffn", "FFN width")):
        if before:
            ax.bar(x, [b[key] for b in before], color="#dddddd", label="before")
        ax.bar(x, values, color="#4c72b0" if key == "heads" else "#dd8452", label="kept")
        for i, v in enumerate(values):
            ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [str(i) for i in x])
        ax.set_xlabel("layer (0 = first; a dropped layer keeps 0)")
        ax.set_title(label)
        top = max([b[key] for b in before] + values + [1])
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.legend(loc="upper right", fontsize=8, ncol=2)
    info = [f"params {metrics.get('params_before', '?'):,} -> {metrics.get('params_after', '?'):,}"
            if isinstance(metrics.get("params_before"), int) else ""]
    if metrics.get("hidden_before") != metrics.get("hidden_after"):
        info.append(f"hidden {metrics.get('hidden_before')} -> {metrics.get('hidden_after')}")
    if metrics.get("vocab_before") != metrics.get("vocab_after"):
        info.append(f"vocab {metrics.get('vocab_before')} -> {metrics.get('vocab_after')}")
    fig.suptitle(f"{title}\n" + "; ".join(i for i in info if i), y=1.06)
    save_figure(fig, Path(path), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
