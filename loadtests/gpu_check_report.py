"""The GPU check's Markdown report, from the results dict it also writes as JSON (a pure function of it).

Every number says how it was measured; the two acceptance targets of issue 9 are evaluated here, so the
verdict is read off one table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtests.gpu_check_config import ENGINE_TARGET, KERNEL_TARGET

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub table; `align` has one letter per column, l or r (default l). Cells are escaped."""

    def cell(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|") if value is not None else "n/a"

    align = align.ljust(len(headers), "l")
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align[: len(headers)]) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(cell(value) for value in row) + " |")
    return "\n".join(lines)


def _number(value: Any, digits: int = 1, suffix: str = "") -> str | None:
    if value is None:
        return None
    return f"{value:,.{digits}f}{suffix}"


def _section(results: dict[str, Any], name: str) -> dict[str, Any]:
    return results.get("sections", {}).get(name) or {"status": "not run"}


def _why_missing(section: dict[str, Any], what: str) -> str:
    status = section.get("status", "not run")
    reason = section.get("error") or section.get("reason")
    if status == "ok" and not reason:
        reason = "; ".join(section.get("notes", [])) or "this run has no such row"
    return f"not measured: {what} is missing (section {status}{': ' + reason if reason else ''})"


# ------------------------------------------------------------------------------------------------ targets


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [_kernel_target(results), _engine_target(results)]


def _kernel_target(results: dict[str, Any]) -> dict[str, Any]:
    t = KERNEL_TARGET
    name = (
        f"similarity kernel ≥ {t['speedup']:g}× PyTorch (matmul + softmax + topk) at C = {t['C']:,}, "
        f"B = {t['B']}, D = {t['D']}, {t['dtype']}, end to end with the top-k on the host"
    )
    section = _section(results, "kernel")
    row = next(
        (r for r in section.get("rows", []) if all(r.get(key) == t[key] for key in ("B", "C", "D", "dtype"))), None
    )
    if row is None or not row.get("kernel_us") or not row.get("torch_us"):
        reason = (row or {}).get("errors") or (row or {}).get("skipped") or section.get("kernel_skipped")
        detail = f"not measured: {reason}" if reason else _why_missing(section, "the target row")
        return {"target": name, "measured": None, "status": NOT_MEASURED, "detail": detail}
    speedup = row["torch_us"] / row["kernel_us"]
    detail = f"kernel {row['kernel_us']:,.1f} µs, torch {row['torch_us']:,.1f} µs"
    if row.get("device_speedup"):
        detail += (
            f"; GPU time alone: kernel {row['kernel_device_us']:,.1f} µs, torch {row['torch_device_us']:,.1f} µs"
            f" ({row['device_speedup']:.2f}×)"
        )
    return {
        "target": name,
        "measured": f"{speedup:.2f}×",
        "status": PASS if speedup >= t["speedup"] else FAIL,
        "detail": detail,
    }


def _engine_target(results: dict[str, Any]) -> dict[str, Any]:
    t = ENGINE_TARGET
    name = (
        f"ViT-B-32 image tower ≥ {t['images_s']:,.0f} images/s at batch {t['batch']}, {t['precision']}, "
        "CUDA graphs, in the torch engine"
    )
    section = _section(results, "engine")
    row = next(
        (
            r
            for r in section.get("rows", [])
            if r.get("precision") == t["precision"]
            and r.get("cuda_graphs") == t["cuda_graphs"]
            and r.get("batch") == t["batch"]
            and r.get("input") == t["input"]
        ),
        None,
    )
    if row is None or not row.get("images_s"):
        reason = (row or {}).get("errors")
        detail = f"not measured: {reason}" if reason else _why_missing(section, "the target row")
        return {"target": name, "measured": None, "status": NOT_MEASURED, "detail": detail}
    rate = row["images_s"]
    detail = "pixels already on the GPU"
    if row.get("roofline_fraction"):
        detail += f"; {row['roofline_fraction']:.0%} of the bf16/fp16 tensor-core roofline"
    return {
        "target": name,
        "measured": f"{rate:,.0f} images/s",
        "status": PASS if rate >= t["images_s"] else FAIL,
        "detail": detail,
    }


# ------------------------------------------------------------------------------------------------ the report


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    machine = results.get("machine", {})
    title = machine.get("device") or ("CPU dry run" if meta.get("dry_run") else "no CUDA GPU")
    parts = [
        f"# GPU check: {title}",
        f"Written {meta.get('finished', '?')} by `{meta.get('command', 'python3 -m loadtests.gpu_check')}` in "
        f"{meta.get('total_s', 0):.0f} s (budget {meta.get('budget_s', 0):.0f} s)."
        + (
            " **Dry run**: tiny sizes on the CPU, to prove the script; no number here is a GPU result."
            if meta.get("dry_run")
            else ""
        ),
        _machine(machine),
        "## Targets (issue 9)",
        markdown_table(
            ["target", "measured", "result", "how"],
            [[t["target"], t["measured"], f"**{t['status']}**", t["detail"]] for t in evaluate_targets(results)],
        ),
        _safe(_steps, results.get("steps", {})),
        _safe(_kernel, _section(results, "kernel")),
        _safe(_engine, _section(results, "engine")),
        _safe(_preprocess, _section(results, "preprocess")),
        _safe(_serve, _section(results, "serve")),
        _safe(_problems, results),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def _safe(part: Any, data: dict[str, Any]) -> str:
    """One part of the report; results of an odd shape (a section killed half-way) cost that part, not the report."""
    try:
        return part(data)
    except Exception as error:
        return (
            f"(the {part.__name__.strip('_')} part could not be written: {type(error).__name__}: {error}; "
            "gpu-report.json has the raw results)"
        )


def _machine(machine: dict[str, Any]) -> str:
    commit = machine.get("commit", "unknown")
    changes = machine.get("uncommitted_changes")
    if changes:
        commit += f" (+ {changes} files with uncommitted changes)"
    packages = ", ".join(f"{k} {v}" for k, v in (machine.get("packages") or {}).items() if v)
    rows: list[list[Any]] = [
        ["GPU (nvidia-smi: name, driver, memory)", "; ".join(machine.get("gpus", [])) or None],
        [
            "torch",
            f"{machine.get('torch')} (CUDA {machine.get('torch_cuda')}, capability {machine.get('capability', 'n/a')})",
        ],
        ["nvcc", machine.get("nvcc")],
        [
            "Python",
            f"{machine.get('python')} ({machine.get('executable')}), {machine.get('cpus')} CPUs, "
            f"{machine.get('platform')}",
        ],
        ["packages", packages or None],
        ["commit", commit],
    ]
    return "## Machine\n\n" + markdown_table(["", ""], rows)


def _status(section: dict[str, Any]) -> str:
    status = section.get("status", "not run")
    seconds = f" in {section['seconds']:.0f} s" if section.get("seconds") is not None else ""
    if status == "ok":
        return f"Status: ok{seconds}."
    reason = section.get("error") or section.get("reason") or ""
    return f"Status: **{status}**{seconds}{': ' + reason if reason else ''}."


def _steps(steps: dict[str, Any]) -> str:
    wheels, build, tests = steps.get("wheels", {}), steps.get("build", {}), steps.get("pytest", {})
    wheel_detail = wheels.get("reason") or (
        f"installed {len(wheels.get('installed', []))}: {', '.join(wheels.get('installed', [])) or 'none'}; "
        f"already there: {', '.join(wheels.get('already_present', [])) or 'none'}"
    )
    if wheels.get("error"):
        wheel_detail += f"; error: {wheels['error']}"
    test_detail = (
        f"{tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, "
        f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"
        if "tests" in tests
        else tests.get("error", "not run")
    )
    rows = [
        ["carried wheels", wheels.get("status", "not run"), _number(wheels.get("seconds"), 1, " s"), wheel_detail],
        [
            "kernel build (nvcc)",
            build.get("status", "not run"),
            _number(build.get("seconds"), 1, " s"),
            build.get("error") or (f"{build.get('path')} ({build.get('kib', 0):.0f} KiB)" if build.get("path") else ""),
        ],
        [
            "tests marked gpu (pytest -m gpu)",
            tests.get("status", "not run"),
            _number(tests.get("seconds"), 1, " s"),
            test_detail,
        ],
    ]
    text = "## Build and tests\n\n" + markdown_table(["step", "status", "time", "details"], rows)
    if tests.get("files"):
        text += "\n\nTest files: " + ", ".join(f"`{f}`" for f in tests["files"]) + "."
    if tests.get("summary"):
        text += f" pytest: `{tests['summary'].strip('= ')}`."
    failed = tests.get("failed") or []
    if failed:
        text += "\n\n" + markdown_table(
            ["failed test", "kind", "message"], [[f["test"], f["kind"], f["message"]] for f in failed[:40]]
        )
        if len(failed) > 40:
            text += f"\n\n… and {len(failed) - 40} more (see the junit XML)."
    if tests.get("skip_reasons"):
        text += "\n\nSkip reasons: " + "; ".join(f"{count}× {reason}" for reason, count in tests["skip_reasons"])
    return text


def _kernel(section: dict[str, Any]) -> str:
    method = section.get("method", {})
    t = KERNEL_TARGET
    text = [
        "## (a) Similarity kernel against PyTorch and numpy",
        _status(section),
        "Per call, k = {k}, softmax with logit scale 100. *kernel*: `CudaSimilarity.rank` on `DeviceArray.from_torch` "
        "embeddings (label matrix cached on the GPU), top-k copied to the host. *torch*: `(100 * x @ L.T)"
        ".softmax(-1).topk(k)` in the same dtype, values and indices `.cpu()`. Both: wall-clock median of up to "
        "{reps} calls after {warmup} warm-ups. *device*: GPU time of the kernels alone (copies excluded), torch "
        "profiler (CUPTI) over {profile_reps} calls. *numpy*: the CPU path (`cosines`, `Scoring.probabilities`, "
        "`ranked`) on float32 host embeddings, only where B×C ≤ {cap}. *top-1 agree*: share of images whose most "
        "probable label is the same for the kernel and torch (a sanity check; fp16 near-ties may differ). "
        "*single µs*: the kernel scoring fp16/bf16 embeddings against the rounded labels alone "
        "(`label_residuals=False`, half the GEMM work). *own GEMM µs*: the default, but with the kernel's own "
        "WMMA/FMA GEMM in place of cuBLAS (the default's GEMM: {gemm}). *max |Δp|*: the largest difference from "
        "the numpy path's probability of the same label, with and without the label residuals (issue 9 bound: "
        "1e-5 fp32, 1e-3 fp16/bf16).".format(
            k=method.get("k", "?"),
            reps=method.get("reps", "?"),
            warmup=method.get("warmup", "?"),
            profile_reps=method.get("profile_reps", "?"),
            cap=f"{method.get('numpy_max_scores', 0):,}",
            gemm=section.get("gemm", "?"),
        ),
    ]
    if section.get("kernel_skipped"):
        text.append(f"Kernel columns: {section['kernel_skipped']}.")
    rows = []
    for r in section.get("rows", []):
        is_target = all(r.get(key) == t[key] for key in ("B", "C", "D", "dtype"))
        ratio = r["kernel_us"] / r["torch_us"] if r.get("kernel_us") and r.get("torch_us") else None
        rows.append(
            [
                r["B"],
                f"{r['C']:,}",
                r["D"],
                r["dtype"],
                _number(r.get("kernel_us")),
                _number(r.get("torch_us")),
                _number(ratio, 2),
                _number(r.get("speedup"), 2, "×"),
                _number(r.get("kernel_device_us")),
                _number(r.get("torch_device_us")),
                _number(r.get("device_speedup"), 2, "×"),
                _number(r.get("numpy_us"), 0),
                _number(r.get("top1_agreement"), 3),
                _number(r.get("kernel_single_us")),
                _number(r.get("kernel_own_gemm_us")),
                _scientific(r.get("max_dp")),
                _scientific(r.get("max_dp_single")),
                f"◀ target ≥ {t['speedup']:g}×" if is_target else "",
            ]
        )
    if rows:
        text.append(
            markdown_table(
                [
                    "B",
                    "C",
                    "D",
                    "dtype",
                    "kernel µs",
                    "torch µs",
                    "kernel ÷ torch",
                    "speed-up",
                    "kernel device µs",
                    "torch device µs",
                    "device speed-up",
                    "numpy µs",
                    "top-1 agree",
                    "single µs",
                    "own GEMM µs",
                    "max |Δp|",
                    "max |Δp| single",
                    "",
                ],
                rows,
                "rrrlrrrrrrrrrrrrrl",
            )
        )
    text.extend(_row_problems(section.get("rows", []), lambda r: f"B={r['B']} C={r['C']} D={r['D']} {r['dtype']}"))
    return "\n\n".join(text)


def _scientific(value: float | None) -> str | None:
    return None if value is None else f"{value:.1e}"


def _row_problems(rows: list[dict[str, Any]], label: Any) -> list[str]:
    lines = [f"- {label(r)} {column}: {message}" for r in rows for column, message in (r.get("errors") or {}).items()]
    return ["Measurement errors:\n\n" + "\n".join(lines)] if lines else []


def _engine(section: dict[str, Any]) -> str:
    model = section.get("model", {})
    flops, peak = section.get("flops_per_image"), section.get("peak_tflops")
    text = ["## (b) ViT-B-32 image tower in the torch engine", _status(section)]
    method = section.get("method", {})
    text.append(
        f"Random-init open_clip `{model.get('architecture', 'ViT-B-32')}` (`models.zoo.load_open_clip(..., None)`), "
        f"{model.get('image_size', '?')} px, in `TorchEngine(device=cuda, max_batch_size=largest batch)`; call: "
        f"{method.get('call', '?')}. Images/s: median of {method.get('reps', '?')} windows of ≥ "
        f"{method.get('seconds_per_rep', '?')} s of back-to-back calls after 3 warm-ups (graph capture included "
        "there). *device* input: float32 pixels already on the GPU (what GPU preprocessing hands over); *host*: "
        "numpy pixels copied to the GPU by each call."
    )
    if flops and peak:
        text.append(
            f"FLOPs per image, counted by `torch.utils.flop_counter` (attention fast path off while counting): "
            f"{flops / 1e9:.2f} GFLOP (= {flops / 2e9:.2f} G multiply-adds; open_clip lists ViT-B-32 at about 4.4). "
            f"Roofline at the H200's measured {peak:g} TFLOP/s dense bf16/fp16: {peak * 1e12 / flops:,.0f} images/s."
        )
    rows = [
        [
            r.get("precision"),
            "yes" if r.get("cuda_graphs") else "no",
            r.get("input"),
            r.get("batch"),
            _number(r.get("images_s"), 0),
            _number(r.get("ms_per_batch"), 2),
            _number(r.get("tflops"), 1),
            _number(100 * r["roofline_fraction"], 1, " %") if r.get("roofline_fraction") else None,
        ]
        for r in section.get("rows", [])
    ]
    if rows:
        text.append(
            markdown_table(
                ["precision", "CUDA graphs", "input", "batch", "images/s", "ms per batch", "TFLOP/s", "of roofline"],
                rows,
                "lllrrrrr",
            )
        )
    text.extend(f"Note: {note}" for note in section.get("notes", []))
    text.extend(_row_problems(section.get("rows", []), lambda r: f"{r.get('precision')} batch {r.get('batch')}"))
    return "\n\n".join(text)


def _preprocess(section: dict[str, Any]) -> str:
    text = ["## (c) Preprocessing: exact CPU path against the device path", _status(section)]
    arguments = section.get("arguments")
    if arguments:
        text.append(
            "`loadtests.preprocess_parity.measure(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")`: "
            "per image set, the CPU path (Pillow, one thread) and the device path (nvJPEG through torchvision on "
            "CUDA) on the same images; Δ in 8-bit levels, embedding cosine of the demo model at its own size."
        )
    if section.get("table"):
        text.append(section["table"])
    elif section.get("rows"):  # killed before it wrote its table: the rows it finished
        from loadtests.preprocess_parity import markdown_table as preprocess_table

        text.append(preprocess_table(section["rows"]))
    return "\n\n".join(text)


def _serve(section: dict[str, Any]) -> str:
    method = section.get("method", {})
    settings = ", ".join(f"{k}={v}" for k, v in (method.get("settings") or {}).items())
    text = ["## (d) /classify end to end", _status(section)]
    if method:
        text.append(
            f"`python -m service.cli serve` in a child process ({settings}); clients: httpx.AsyncClient in another "
            f"process, each sending one request after another for {method.get('seconds')} s per level after "
            f"{method.get('warmup_seconds')} s of warm-up at the highest level; {method.get('images')}, "
            f"{method.get('labels')} labels, top {method.get('top_k')}. Latency at the client; *similarity ms*: "
            "the server's own `timing.similarity_ms` (median). *client CPU*: the load generator's CPU time ÷ wall "
            "time; near 100 % it, not the server, was the limit."
        )
    rows = []
    for run in section.get("runs", []):
        for level in run.get("levels", []):
            rows.append(
                [
                    run["similarity"],
                    level["concurrency"],
                    _number(level["requests_s"], 0),
                    _number(level.get("p50_ms")),
                    _number(level.get("p95_ms")),
                    _number(level.get("p99_ms")),
                    level["errors"],
                    _number(level.get("server_similarity_ms_median"), 3),
                    _number(100 * level["client_cpu"], 0, " %"),
                ]
            )
    if rows:
        text.append(
            markdown_table(
                [
                    "CLIPSERVE_SIMILARITY",
                    "concurrency",
                    "requests/s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "errors",
                    "similarity ms",
                    "client CPU",
                ],
                rows,
                "lrrrrrrrr",
            )
        )
    for run in section.get("runs", []):
        if run.get("engine"):
            text.append(
                f"Server with similarity={run['similarity']}: {run['engine']}, ready in "
                f"{run.get('startup_s', 0):.1f} s."
            )
        for level in run.get("levels", []):
            if level.get("error_kinds"):
                text.append(f"Errors at concurrency {level['concurrency']}: {level['error_kinds']}.")
        if run.get("errors"):
            text.append(
                f"similarity={run['similarity']} failed: {run['errors']}\n\n```\n{run.get('server_log_tail', '')}\n```"
            )
    text.extend(f"Note: {note}" for note in section.get("notes", []))
    return "\n\n".join(text)


def _problems(results: dict[str, Any]) -> str:
    blocks = []
    for name, section in results.get("sections", {}).items():
        if section.get("status") == "error":
            trace = section.get("traceback") or "\n".join(section.get("tail", []))
            blocks.append(f"### {name}\n\n{section.get('error', '')}\n\n```\n{trace.strip()}\n```")
    return "## Errors\n\n" + "\n\n".join(blocks) if blocks else ""
