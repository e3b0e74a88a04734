"""The parity report of one export as a Markdown table, for people (the manifest keeps the numbers)."""

from __future__ import annotations

from models.manifest import Manifest


def _required(check) -> str:  # type: ignore[no-untyped-def]
    parts = [f"cos ≥ {check.required_min_cosine}"]
    if check.required_max_abs_diff is not None:
        parts.append(f"abs diff ≤ {check.required_max_abs_diff:.0e}")
    if check.required_top1_agreement is not None:
        parts.append(f"top-1 ≥ {check.required_top1_agreement:.0%}")
    return ", ".join(parts)


def parity_markdown(manifest: Manifest) -> str:
    sizes = {a.path: a.bytes for a in manifest.artifacts}
    lines = [
        f"Parity of `{manifest.name}` against PyTorch: {manifest.parity.probe_images} probe images, "
        f"{manifest.parity.probe_texts} probe prompts, batch sizes "
        f"{', '.join(map(str, manifest.parity.checks[0].batch_sizes))}"
        + (f"; top-1 task: {manifest.parity.top1_task}" if manifest.parity.top1_task else "")
        + f". Export took {manifest.exporter.seconds:.0f} s.",
        "",
        "| graph | size | min cosine | max abs diff | top-1 agreement | gate | passed |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for check in manifest.parity.checks:
        top1 = "—" if check.top1_agreement is None else f"{check.top1_agreement:.1%}"
        lines.append(
            f"| {check.artifact} | {sizes[check.artifact] / 1e6:.1f} MB | {check.min_cosine:.7f} "
            f"| {check.max_abs_diff:.2e} | {top1} | {_required(check)} | {'yes' if check.passed else 'NO'} |"
        )
    return "\n".join(lines) + "\n"
