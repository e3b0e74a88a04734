"""The CUDA similarity kernel compiles, warning-free, for every GPU family we ship (and PTX for newer ones).

Runs nvcc only; no GPU. CI sets CLIPSERVE_REQUIRE_NVCC=1, so a missing toolkit fails there instead of skipping.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from service.kernels import ARCHITECTURES, ENTRY_POINTS, PTX_ARCHITECTURE, nvcc_command
from service.kernels.build import main as build_main
from tests.service.kernels.host_kernels import nvcc_or_skip


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, SM version) of each image in a fatbin container, read from its headers: the container header
    (magic 0xBA55ED50, u16 version, u16 header size, u64 payload size), then per image a u16 kind (1 PTX,
    2 ELF), u16 version, u32 header size, u32 padded payload size, ... and the SM version at byte 28. (The
    toolkit's cuobjdump prints the same, but it is not part of the compiler package installed here.)"""
    magic, _, header_size, payload_size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == 0xBA55ED50, "not a fatbin"
    entries, offset = [], header_size
    while offset < header_size + payload_size:
        kind, _, entry_header, padded = struct.unpack_from("<HHII", data, offset)
        (sm,) = struct.unpack_from("<I", data, offset + 28)
        entries.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
        offset += entry_header + padded
    return entries


def test_the_fatbin_holds_machine_code_for_every_architecture_and_ptx(tmp_path: Path) -> None:
    nvcc = nvcc_or_skip()
    fatbin = tmp_path / "similarity.fatbin"
    assert build_main(["--out", str(fatbin), "--nvcc", nvcc]) == 0
    assert not fatbin.with_name("similarity.fatbin.partial").exists()
    data = fatbin.read_bytes()
    entries = fatbin_entries(data)
    assert sorted(sm for kind, sm in entries if kind == "elf") == sorted(int(a[3:]) for a in ARCHITECTURES)
    assert [sm for kind, sm in entries if kind == "ptx"] == [int(PTX_ARCHITECTURE.removeprefix("compute_"))]
    for name in ENTRY_POINTS:
        # extern "C": the ELF sections carry the plain names cuModuleGetFunction looks up.
        assert f".nv.info.{name}".encode() in data


def test_a_compile_error_fails_the_build_and_leaves_no_fatbin(tmp_path: Path) -> None:
    nvcc = nvcc_or_skip()
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    command = nvcc_command(tmp_path / "out.fatbin", nvcc=nvcc, architectures=("sm_90",))
    command[-1] = str(broken)
    assert subprocess.run(command, capture_output=True).returncode != 0
    assert not (tmp_path / "out.fatbin").exists()


def test_warnings_are_errors(tmp_path: Path) -> None:
    nvcc = nvcc_or_skip()
    noisy = tmp_path / "noisy.cu"
    noisy.write_text('extern "C" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }\n')
    command = nvcc_command(tmp_path / "out.fatbin", nvcc=nvcc, architectures=("sm_90",))
    command[-1] = str(noisy)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0, result.stderr
