"""docs/benchmarks.md from one `make bench` run's results (the dict `loadtests.bench.__main__` writes to JSON)."""

from __future__ import annotations

from typing import Any

from loadtests.bench.plots import STAGE_NAMES, breakdown_segments


def _n(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _setting(run: dict[str, Any]) -> list[str]:
    machine = run["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version != "-")
    flags = ", ".join(machine["cpu_flags"]) or "none of note"
    return [
        f"Measured {machine['date_utc']} in one run of `make bench` ({run['wall_s'] / 60:.1f} minutes) on "
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores ({flags}), "
        f"{_n(machine['memory_gib'], '.0f')} GiB, {machine['os']}, Python {machine['python']}.",
        "",
        f"Libraries: {packages}; numpy BLAS {machine['numpy_blas']}.",
        "",
        "Models: `clipserve-demo` (the built-in demo, 64 px) and `vit-b-32`, open_clip's ViT-B-32 architecture "
        "with random weights exported by `clipserve export --model ViT-B-32` (224 px; no weights can be downloaded "
        "here, and speed does not depend on the weights). The transformers app serves the same architecture, also "
        "random (`loadtests/bench/transformers_app.py`). Every HTTP request carries one 640×480 JPEG and uses one "
        'template, "a photo of a {}."; label vectors are warm unless a table says cold. The machine is shared '
        "and noisy: compare numbers within this run, not across runs.",
    ]


def _targets(run: dict[str, Any]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| target | measured | verdict | compared |",
        "|---|---:|---|---|",
    ]
    for target in run["targets"]:
        measured = _n(target["measured"], ".2f")
        lines.append(f"| {target['name']} | {measured} | {target['verdict']} | {target['detail']} |")
    lines += ["", *run.get("target_notes", [])]
    return lines


def _machine(run: dict[str, Any]) -> list[str]:
    return [
        "## The machine's ceiling",
        "",
        f"numpy fp32 matrix product (2048×2048): **{run['matmul_gflops']:.0f} GFLOP/s**. At "
        f"{run['vit_gflop_per_image']:g} GFLOP per 224 px ViT-B-32 image that allows at most "
        f"{run['matmul_gflops'] / run['vit_gflop_per_image']:.1f} images/s in fp32; only lower precision can go "
        "past it.",
    ]


def _engines(run: dict[str, Any]) -> list[str]:
    lines = [
        "## Raw image engines",
        "",
        "Images/s of the image tower alone (random pixels, no service), the median of timed windows after a warm-up. "
        "`of matmul` is the achieved GFLOP/s over the machine's fp32 matmul GFLOP/s (lower precision can exceed 100 "
        "%). `min cos` compares embeddings with ONNX Runtime fp32 on the same inputs (PyTorch's ViT-B-32 is another "
        "random init, so it has none).",
        "",
        "| model | runtime | precision | batch 1 | batch 8 | batch 32 | of matmul at 32 | min cos | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = run["engines"]
    seen = list(dict.fromkeys((r["model"], r["runtime"], r["precision"]) for r in rows))
    for model, runtime, precision in seen:
        mine = {
            r["batch"]: r for r in rows if (r["model"], r["runtime"], r["precision"]) == (model, runtime, precision)
        }
        at_32 = mine.get(32)
        fraction = (
            at_32["images_per_s"] * at_32["gflop_per_image"] / run["matmul_gflops"]
            if at_32 and at_32["images_per_s"] and at_32.get("gflop_per_image")
            else None
        )
        cosine = next((r["min_cosine_vs_fp32"] for r in mine.values() if r["min_cosine_vs_fp32"] is not None), None)
        notes = "; ".join(dict.fromkeys(r["note"] for r in mine.values() if r["note"]))
        rates = [_n(mine[b]["images_per_s"]) if b in mine else "-" for b in (1, 8, 32)]
        lines.append(
            f"| {model} | {runtime} | {precision} | {' | '.join(rates)} | {_n(fraction, '.0%')} "
            f"| {_n(cosine, '.5f')} | {notes} |"
        )
    lines += ["", "![raw engines](benchmarks/engines.png)"]
    return lines


def _http(run: dict[str, Any]) -> list[str]:
    lines = [
        "## /classify over HTTP",
        "",
        "N clients, each sending its next request when its last is answered, for a fixed time per level "
        "(`loadtests.benchmark.drive`); requests/s and latencies count the 200s, every other outcome is listed. "
        "The levels run one after another, minutes apart, and this shared machine's speed drifts between minutes "
        "(the 1,000-label levels also come right after the cold encoding of those labels, 100 s of full load for "
        "ViT-B-32): to compare 10 with 1,000 labels, use the breakdown below, where the two take turns.",
        "",
        "| service | labels | concurrency | requests/s | p50 ms | p99 ms | 200s | errors | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for level in run["levels"]:
        lines.append(
            f"| {level['service']} | {level['labels']:,} | {level['concurrency']} "
            f"| {_n(level['requests_per_s'], '.2f')} "
            f"| {_n(level['p50_ms'])} | {_n(level['p99_ms'])} | {level['ok']} | {level['errors']} | {level['note']} |"
        )
    lines += ["", "![HTTP](benchmarks/http.png)"]
    return lines


def _breakdown(run: dict[str, Any]) -> list[str]:
    lines = [
        "## Where a request's time goes",
        "",
        "Medians over sequential requests at concurrency 1, from the `Server-Timing` header the service sends with "
        "every answer. The stages on the images' path run one after another; the labels' stage runs beside them. "
        "`hand-offs` is the rest of the app's own time (thread pools, the batcher's worker, middleware); `HTTP + "
        "client` is what the server's clock does not see (the socket, uvicorn's parsing, the client).",
        "",
    ]
    rows = run["breakdowns"]
    header = [f"{row['model']}, {row['labels']:,} labels" for row in rows]
    lines += ["| stage | " + " | ".join(header) + " |", "|---|" + "---:|" * len(rows)]
    segments = [dict(breakdown_segments(row)) for row in rows]
    for stage, name in STAGE_NAMES.items():
        lines.append(f"| {name} | " + " | ".join(_n(s.get(stage), ".2f") for s in segments) + " |")
    lines.append(
        "| labels (beside the images) | " + " | ".join(_n(r["stages_ms"].get("labels"), ".2f") for r in rows) + " |"
    )
    lines.append("| **client latency** | " + " | ".join(f"**{r['client_ms']:.2f}**" for r in rows) + " |")
    lines += ["", "![breakdown](benchmarks/breakdown.png)"]
    return lines


def _label_cache(run: dict[str, Any]) -> list[str]:
    lines = [
        "## The label cache, cold and warm",
        "",
        "1,000 labels no cache has seen, at concurrency 1: the first request encodes them (1,000 prompts through the "
        "text engine); the same labels in reverse order find every vector cached but are a new label set; the same "
        "request again finds its label set's matrix kept whole.",
        "",
        "| model | cold ms | prompts/s when cold | vectors cached, new set ms | same set ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, timing in run["label_cache"].items():
        lines.append(
            f"| {model} | {timing['cold_ms']:.0f} | {timing['prompts_per_s']:.0f} | {timing['vectors_warm_ms']:.1f} "
            f"| {timing['set_warm_ms']:.1f} |"
        )
    return lines


def markdown(run: dict[str, Any]) -> str:
    sections = [
        ["# Benchmarks", "", *_setting(run)],
        _targets(run),
        _machine(run),
        _engines(run),
        _http(run),
        _breakdown(run),
        _label_cache(run),
        [
            "## Reproduce",
            "",
            "`make bench` (about 10 minutes here, and 3 more the first time, to export ViT-B-32 into `.bench/`). It "
            "rewrites this file, `docs/benchmarks.json` (every number above) and the plots in `docs/benchmarks/`; "
            "`python -m loadtests.bench --render docs/benchmarks.json` redraws them from the saved numbers.",
        ],
    ]
    return "\n".join(line for section in sections for line in [*section, ""])
