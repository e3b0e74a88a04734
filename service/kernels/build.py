"""Build the similarity kernel's fatbin: `python -m service.kernels.build [--out PATH] [--nvcc PATH]`.

Run by `make kernels` and by the gpu image's build stage; needs the CUDA toolkit's nvcc (13.0 or newer), no GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from service.kernels import ARCHITECTURES, DEFAULT_FATBIN, PTX_ARCHITECTURE, nvcc_command


def build(output: Path = DEFAULT_FATBIN, nvcc: str = "nvcc") -> Path:
    """Compile into `output` (written whole: a staging file is moved in only after nvcc succeeded)."""
    if shutil.which(nvcc) is None:
        raise FileNotFoundError(f"{nvcc} not found: the kernel build needs the CUDA toolkit (nvcc 13.0 or newer)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial")
    subprocess.run(nvcc_command(staging, nvcc=nvcc), check=True)
    staging.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FATBIN, help="fatbin to write")
    parser.add_argument("--nvcc", default="nvcc", help="the nvcc to use")
    args = parser.parse_args(argv)
    print(f"building {args.out} for {', '.join(ARCHITECTURES)} + PTX {PTX_ARCHITECTURE} ...", flush=True)
    start = time.perf_counter()
    try:
        path = build(args.out, args.nvcc)
    except (FileNotFoundError, subprocess.CalledProcessError) as error:
        print(f"kernel build failed: {error}", file=sys.stderr)
        return 1
    print(f"built {path} ({path.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
