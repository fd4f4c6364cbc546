"""What `bgjax eval` writes besides metrics.json: the paper-style table and the t-SNE figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bgjax.fileio import atomic_write

TABLES = {"bg1k": ("Table 1", "BG1K"), "bgpair": ("Table 2", "BG-pair")}
MIN_TSNE_POINTS = 4


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # FID(x, x) ~ -1e-12: no "-0.00"


def markdown_table(metrics: dict) -> str:
    """The paper's Tables 1 (BG1K) and 2 (BG-pair): a row per method, columns CLIP-sim and FID."""
    number, name = TABLES[metrics["split"]]
    s = metrics["settings"]
    versus = "the original ad image" if metrics["split"] == "bg1k" else "the reference image"
    lines = [f"# {number}: {name} ({metrics['num_items']} products x {s['images_per_item']} images, "
             f"{s['steps']} {s['sampler']} steps, guidance {s['guidance']}, seed {s['seed']})", "",
             "| Method | CLIP-sim ↑ | FID ↓ | Images |", "| --- | ---: | ---: | ---: |"]
    notes = []
    for row in metrics["variants"].values():
        label = row["label"]
        if row.get("skipped"):
            notes.append(f"{label}: skipped, {row['skipped']}")
            lines.append(f"| {label} | — | — | 0 |")
            continue
        for key, what in (("clip_similarity_note", "CLIP-sim"), ("fid_note", "FID"), ("note", None)):
            if row.get(key):
                notes.append(f"{label}: {what + ' ' if what else ''}{row[key]}")
        lines.append(f"| {label} | {_number(row['clip_similarity'], 4)} | {_number(row['fid'], 2)} | "
                     f"{row['num_images']} |")
    ref = metrics["fid_reference"]
    lines += ["", f"CLIP-sim: cosine similarity of CLIP image embeddings with the product masked out (background "
                  f"only), generated image vs {versus}, mean over images. FID: generated images vs the split's "
                  f"{ref['num_images']} real ad images (clean-fid resize, pool3 features)."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE (perplexity min(30, (N - 1) / 3), PCA init).

    On one thread: beside JAX's thread pool, OpenMP's spinning workers made a 5-point t-SNE take
    6 s instead of 0.1 s on 2 cores (1000 points: 8 s on one thread).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(embeddings)
    perplexity = max(1.0, min(30.0, (n - 1) / 3))
    with threadpool_limits(1):
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            np.asarray(embeddings, np.float64))


def tsne_figure(panels: list[tuple[str, np.ndarray, list[str]]], path: Path, seed: int = 0) -> dict:
    """A PNG with one t-SNE panel per (title, embeddings (N, D), categories), points coloured by category
    (the same colour for a category in every panel), as the paper's Figure 3. Returns the 2-D points per
    panel ({title: {"x", "y", "category"} or {"skipped": reason}})."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays untouched

    categories = sorted({c for _, _, cats in panels for c in cats})
    palette = _palette(len(categories))
    colour = {c: palette[i] for i, c in enumerate(categories)}
    columns = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / columns) if panels else 1
    figure = Figure(figsize=(4.2 * columns + (2.6 if categories else 0), 4.0 * rows), dpi=100)
    points = {}
    for i, (title, embeddings, cats) in enumerate(panels):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(embeddings) < MIN_TSNE_POINTS:
            reason = f"{len(embeddings)} images: t-SNE needs at least {MIN_TSNE_POINTS}"
            ax.text(0.5, 0.5, reason, ha="center", va="center", transform=ax.transAxes, fontsize=8)
            points[title] = {"skipped": reason}
            continue
        xy = tsne_2d(embeddings, seed)
        for c in categories:
            keep = np.asarray([k == c for k in cats])
            if keep.any():
                ax.scatter(xy[keep, 0], xy[keep, 1], s=12, color=colour[c], label=c)
        points[title] = {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "category": list(cats)}
    if categories:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colour[c], label=c) for c in categories]
        figure.legend(handles=handles, loc="center right", fontsize=7, ncol=1 if len(categories) <= 30 else 2,
                      frameon=False)
        figure.subplots_adjust(right=1 - 2.6 / figure.get_figwidth())
    figure.suptitle("t-SNE of background CLIP embeddings, coloured by category")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return points


def _palette(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]
