"""The figures a sweep's parent run shows: the best metric against each swept value, a
parallel-coordinates plot of every trial, and the trials' learning curves."""

from __future__ import annotations

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numeric(values: pd.Series) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _axis(values: pd.Series) -> tuple[list[float], list[str] | None]:
    """Positions on [0, 1] for one parallel-coordinates axis, and its category labels (None for
    numbers: a range, log-scaled when it spans more than a factor of 10)."""
    import math

    if _numeric(values):
        x = [float(v) for v in values]
        if min(x) > 0 and max(x) / min(x) > 10:
            x = [math.log10(v) for v in x]
        low, high = min(x), max(x)
        return [(v - low) / (high - low) if high > low else 0.5 for v in x], None
    labels = sorted({str(v) for v in values})
    step = 1 / max(1, len(labels) - 1)
    return [labels.index(str(v)) * step if len(labels) > 1 else 0.5 for v in values], labels


def metric_by_value(table: pd.DataFrame, keys: list[str], column: str = "best_knn"):
    """The trials' best metric (``column``) against each swept value, coloured by epochs run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        values = table[key]
        if _numeric(values):
            ax.scatter(values, table[column], c=table["epochs"], cmap="viridis")
            if key.endswith("temperature"):
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], table[column], c=table["epochs"],
                       cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{column.replace('_', ' ')} (colour: epochs run)")
    fig.tight_layout()
    return fig


def parallel_coordinates(table: pd.DataFrame, keys: list[str], column: str):
    """One line per trial through an axis per swept key and one for ``column``, coloured by
    ``column``; each axis spans its own values (its ends are labelled)."""
    plt = _pyplot()
    axes_keys = [*keys, column]
    fig, ax = plt.subplots(figsize=(2.2 * len(axes_keys) + 1, 3.6))
    positions = {key: _axis(table[key]) for key in axes_keys}
    scored = table[column].astype(float)
    low, high = scored.min(), scored.max()
    cmap = plt.get_cmap("viridis")
    for i in range(len(table)):
        shade = 0.5 if not high > low else (scored.iloc[i] - low) / (high - low)
        ax.plot(range(len(axes_keys)), [positions[k][0][i] for k in axes_keys],
                color=cmap(0.0 if pd.isna(shade) else shade), alpha=0.8)
    for j, key in enumerate(axes_keys):
        ax.axvline(j, color="0.6", linewidth=0.8)
        _, labels = positions[key]
        if labels is None:
            values = table[key].astype(float)
            ax.text(j, -0.06, f"{values.min():.3g}", ha="center", va="top", fontsize=7)
            ax.text(j, 1.04, f"{values.max():.3g}", ha="center", va="bottom", fontsize=7)
        else:
            for k, label in enumerate(labels):
                y = k / max(1, len(labels) - 1) if len(labels) > 1 else 0.5
                ax.text(j + 0.03, y, label, fontsize=6, va="center")
    ax.set_xticks(range(len(axes_keys)), [k.replace("clustering.", "").replace("method.", "")
                                          for k in axes_keys], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_title(f"{len(table)} trials, colour: {column}", fontsize=9)
    fig.tight_layout()
    return fig


def learning_curves(curves: dict[str, list[tuple[int, float]]], metric: str,
                    exploits: dict[str, list[int]] | None = None):
    """``metric`` per epoch for every trial (``{trial_id: [(epoch, value), ...]}`` in the order
    trained); ``exploits``: the epochs a PBT trial continued from a donor (marked)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for trial, points in curves.items():
        line, = ax.plot([e for e, _ in points], [v for _, v in points], marker=".", linewidth=1,
                        label=trial)
        for epoch in (exploits or {}).get(trial, []):
            hits = [v for e, v in points if e == epoch]
            if hits:
                ax.scatter([epoch], hits[-1:], marker="*", s=80, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    if any((exploits or {}).values()):
        ax.set_title("star: the trial continued from a better trial's checkpoint", fontsize=8)
    if len(curves) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
