"""The PNG plots of `make bench`: engines, HTTP throughput and latency, and the per-request breakdown.

matplotlib (the `bench` extra) with the Agg backend, no display needed. Each function takes the JSON-ready rows
the run wrote (docs/benchmarks.json) and one output path, so a plot can be redrawn from a saved run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The breakdown's stages in the order a request meets them; anything else the server notes goes last.
STAGE_ORDER = ("parse", "base64", "preprocess", "image_queue", "image_engine", "similarity", "respond")
STAGE_NAMES = {
    "outside": "HTTP + client (outside the app)",
    "parse": "read + check body",
    "base64": "base64",
    "preprocess": "decode + preprocess",
    "image_queue": "queue wait",
    "image_engine": "image engine",
    "similarity": "similarity",
    "respond": "build + encode answer",
    "other": "hand-offs (rest of app time)",
}


def engines(rows: list[dict[str, Any]], matmul_gflops: float, path: Path) -> None:
    """Images/s per engine and batch, one panel per model, with the matmul-implied ceiling where the model's
    GFLOP per image is known."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [row for row in rows if row["model"] == model and row["images_per_s"]]
        engines_seen = list(dict.fromkeys((row["runtime"], row["precision"]) for row in mine))
        batches = sorted({row["batch"] for row in mine})
        width = 0.8 / max(len(engines_seen), 1)
        for i, (runtime, precision) in enumerate(engines_seen):
            rates = {
                row["batch"]: row["images_per_s"]
                for row in mine
                if (row["runtime"], row["precision"]) == (runtime, precision)
            }
            xs = [b + (i - (len(engines_seen) - 1) / 2) * width for b in range(len(batches))]
            ax.bar(xs, [rates.get(batch, 0) for batch in batches], width, label=f"{runtime} {precision}")
        gflop = next((row["gflop_per_image"] for row in mine if row.get("gflop_per_image")), None)
        if gflop:
            ceiling = matmul_gflops / gflop
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
            ax.text(
                len(batches) - 0.5,
                ceiling,
                f" fp32 matmul ceiling {ceiling:.1f}/s",
                va="bottom",
                ha="right",
                fontsize=8,
            )
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("images/s")
        ax.set_title(model)
        ax.legend(fontsize=8)
    figure.suptitle("Raw image engines (no service)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def http(levels: list[dict[str, Any]], path: Path) -> None:
    """Requests/s and p50 latency against concurrency, per service and label count (log scales: the services
    differ by orders of magnitude)."""
    figure, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    series = list(dict.fromkeys((level["service"], level["labels"]) for level in levels))
    for service, labels in series:
        points = [
            level
            for level in levels
            if (level["service"], level["labels"]) == (service, labels) and level["requests_per_s"] is not None
        ]
        if not points:
            continue
        xs = [level["concurrency"] for level in points]
        style = "-" if labels == 10 else "--"
        label = f"{service}, {labels} labels"
        rate_ax.plot(xs, [level["requests_per_s"] for level in points], style, marker="o", label=label)
        latency_ax.plot(xs, [level["p50_ms"] for level in points], style, marker="o", label=label)
    for ax, title in ((rate_ax, "requests/s (one image each)"), (latency_ax, "p50 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    rate_ax.legend(fontsize=7)
    figure.suptitle("POST /classify over HTTP, one 640x480 JPEG per request")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def breakdown_segments(breakdown: dict[str, Any]) -> list[tuple[str, float]]:
    """(stage, ms) along one request at concurrency 1, adding up to the client's latency: the images' path in the
    app, the rest of the app's time (thread hand-offs, middleware), and what lies outside the app. The labels'
    stage runs beside the images' path, so it is not a segment of its own."""
    stages = breakdown["stages_ms"]
    on_path = [(stage, stages[stage]) for stage in STAGE_ORDER if stage in stages]
    other = stages.get("app", 0.0) - sum(ms for _, ms in on_path)
    outside = breakdown["client_ms"] - stages.get("app", 0.0)
    return [*on_path, ("other", max(other, 0.0)), ("outside", max(outside, 0.0))]


def breakdown(rows: list[dict[str, Any]], path: Path) -> None:
    """One stacked bar per (model, label count): where a request's time goes at concurrency 1."""
    figure, ax = plt.subplots(figsize=(12, 1.6 + 0.6 * len(rows)))
    colours = plt.get_cmap("tab10")
    names = list(STAGE_NAMES)
    for y, row in enumerate(rows):
        left = 0.0
        for stage, ms in breakdown_segments(row):
            ax.barh(
                y, ms, left=left, color=colours(names.index(stage) % 10), label=STAGE_NAMES[stage] if y == 0 else None
            )
            left += ms
    ax.set_yticks(range(len(rows)), [f"{row['model']}, {row['labels']} labels" for row in rows])
    ax.set_xlabel("ms (medians at concurrency 1)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Where one request's time goes (Server-Timing)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
