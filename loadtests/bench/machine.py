"""The machine a benchmark ran on, and its compute ceiling.

`describe()` records what the numbers depend on: the CPU model and the instruction sets that matter for each
precision (AVX-512 BF16 / AMX for OpenVINO bf16, VNNI for int8), how many cores this process may use, memory, and
the versions of the libraries that do the work. `matmul_gflops()` measures the ceiling everything else is compared
with: numpy's fp32 matrix product on square matrices large enough to be compute bound, in GFLOP/s.

A model's cost per image in GFLOP (2 FLOPs per multiply-accumulate) turns images/s into GFLOP/s, and so into a
fraction of that ceiling: `onnx_gflop_per_image` counts it from an exported fp32 image graph (Conv, MatMul, Gemm
and Attention nodes after ONNX shape inference at batch 1), and `VIT_B_32_GFLOP_PER_IMAGE` is the textbook figure
for ViT-B-32 at 224 px to check that count against.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.timing import rate_per_second

# ViT-B-32's image tower at 224 px: about 4.4 GMACs (open_clip's model profile lists 4.41 GMACs), so about
# 8.8 GFLOP per image at 2 FLOPs per multiply-accumulate. An approximation: it counts the matrix products (patch
# embedding, QKV/out projections, attention, MLP) and leaves out layer norms, softmax and GELU, which add ~1 %.
VIT_B_32_GMACS_PER_IMAGE = 4.4
VIT_B_32_GFLOP_PER_IMAGE = 2 * VIT_B_32_GMACS_PER_IMAGE

PACKAGES = (
    "numpy",
    "onnxruntime",
    "openvino",
    "torch",
    "open_clip_torch",
    "transformers",
    "fastapi",
    "uvicorn",
    "pydantic",
)
# The /proc/cpuinfo flags that decide which precisions have fast kernels here.
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_cpu_limit() -> float | None:
    """Cores this container may use by its cgroup v2 quota (cpu.max), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else round(int(quota) / int(period), 2)


def _affinity_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed version of each distribution, "-" for one that is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def _numpy_blas() -> str:
    try:
        config: Any = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # the layout of numpy's build config is not an API; the BLAS name is only nice to have
        return "?"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on a shared machine shows here (None where unknown)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe() -> dict[str, Any]:
    """What the benchmark's numbers depend on, as plain JSON-ready values."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "logical_cores": os.cpu_count(),
        "affinity_cores": _affinity_cores(),
        "cgroup_cpu_limit": _cgroup_cpu_limit(),
        "memory_gib": _memory_gib(),
        "load_average": load_average(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy_blas": _numpy_blas(),
        "packages": package_versions(),
    }


def matmul_gflops(seconds: float = 2.0, *, n: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 matmul ceiling with numpy, in GFLOP/s: the median over `reps` windows (`seconds` in all)
    of n x n @ n x n products, each 2·n³ FLOPs. n = 2048 is compute bound: 48 MiB of operands, 17 GFLOP a product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    products_per_s = rate_per_second(lambda: np.matmul(a, b, out=out), 1, warmup=1, reps=reps, seconds=seconds / reps)
    return products_per_s * 2 * n**3 / 1e9


# ---------------------------------------------------------------------------------------- FLOPs of an image graph

_COUNTED = {"Conv", "MatMul", "Gemm", "Attention"}
# Ops that multiply matrices in a way the count below does not read; a graph with one gets no count (None).
_UNCOUNTED = {"ConvTranspose", "Einsum", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}


def onnx_gflop_per_image(path: str | Path) -> float | None:
    """GFLOP per image of an fp32 ONNX image graph (2 per multiply-accumulate of its Conv, MatMul, Gemm and Attention
    nodes, shapes from ONNX shape inference with the batch fixed at 1), or None when it cannot be counted reliably:
    onnx not installed, a shape left unknown, control flow, or a matrix op this count does not read.

    Element-wise work (norms, activations, softmax) is not counted: a few % of a CLIP tower."""
    try:
        import onnx
        from onnx import inliner, shape_inference
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    if model.functions:  # dynamo exports may wrap modules in local functions: count their nodes in place
        model = inliner.inline_local_functions(model)
    graph = model.graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.shape.dim:
        return None
    batch = inputs[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception:  # onnx raises InferenceError / ValidationError subclasses; any of them means no count
        return None
    shapes: dict[str, list[int]] = dict(weights)
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]

    def shape(name: str) -> list[int]:
        found = shapes.get(name)
        if not found or not all(d > 0 for d in found):
            raise LookupError(name)
        return found

    macs = 0
    try:
        for node in graph.node:
            if node.op_type in _UNCOUNTED or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
                return None
            if node.op_type not in _COUNTED:
                continue
            out = shape(node.output[0])
            if node.op_type == "Conv":  # weight [Cout, Cin/groups, *kernel]: each output element reads Cin/g·k
                macs += math.prod(out) * math.prod(shape(node.input[1])[1:])
            elif node.op_type == "MatMul":
                macs += math.prod(out) * shape(node.input[0])[-1]
            elif node.op_type == "Gemm":
                trans_a = any(a.name == "transA" and a.i for a in node.attribute)
                a = shape(node.input[0])
                macs += math.prod(out) * (a[0] if trans_a else a[1])
            else:  # Attention (opset 23): Q·Kᵀ and probabilities·V, Q/K/V as [B, H, L, D] or [B, L, H·D]
                key = shape(node.input[1])
                key_length = key[-2] if len(key) == 4 else key[1]
                macs += key_length * (math.prod(shape(node.input[0])) + math.prod(out))
    except LookupError:
        return None
    return 2 * macs / 1e9
