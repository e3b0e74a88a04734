"""`make gpu-check`'s script, proven on the CPU before its one run on a lent GPU machine.

The report writer runs on hand-written results; the wheel step installs real (tiny, hand-built) wheels with the
real pip, offline; a failing or hung section is simulated at the process boundary (`run_streaming`, faked and
said so in the test); and the whole script runs in its --dry-run mode, every step and section for real at tiny
sizes on the CPU.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from loadtests import gpu_check, gpu_check_setup, gpu_wheels
from loadtests.gpu_check_config import Recorder, SectionSkipped, config_for, measure, run_guarded
from loadtests.gpu_check_report import FAIL, NOT_MEASURED, PASS, evaluate_targets, markdown_table, render
from loadtests.gpu_check_setup import Finished, Wheel, parse_junit, select_wheels

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ the report


def canned_results(*, kernel_us: float = 100.0, torch_us: float = 400.0, engine_rate: float = 25_000.0) -> dict:
    kernel_rows = [
        {
            "B": 1,
            "C": 10,
            "D": 512,
            "dtype": "float16",
            "k": 5,
            "kernel_us": 30.0,
            "torch_us": 60.0,
            "speedup": 2.0,
            "numpy_us": 15.0,
            "top1_agreement": 1.0,
        },
        {
            "B": 256,
            "C": 21_843,
            "D": 768,
            "dtype": "float16",
            "k": 5,
            "kernel_us": kernel_us,
            "torch_us": torch_us,
            "speedup": torch_us / kernel_us,
            "kernel_device_us": 40.0,
            "torch_device_us": 200.0,
            "device_speedup": 5.0,
            "numpy_us": 500_000.0,
            "top1_agreement": 0.996,
        },
        {
            "B": 256,
            "C": 100_000,
            "D": 768,
            "dtype": "float16",
            "k": 5,
            "kernel_us": None,
            "torch_us": 900.0,
            "errors": {"kernel_us": "CudaError: CUDA cuLaunchKernel failed | bad"},
            "numpy_us": None,
            "skipped": {"numpy_us": "B×C above 5,591,808"},
        },
    ]
    engine_rows = [
        {
            "precision": "fp16",
            "cuda_graphs": True,
            "batch": 256,
            "input": "device",
            "images_s": engine_rate,
            "ms_per_batch": 256 / engine_rate * 1000,
            "tflops": 200.0,
            "roofline_fraction": 0.25,
        },
        {"precision": "fp16", "cuda_graphs": False, "batch": 1, "input": "device", "images_s": 400.0},
    ]
    return {
        "meta": {
            "started": "then",
            "finished": "now",
            "dry_run": False,
            "budget_s": 450,
            "total_s": 300,
            "command": "python3 -m loadtests.gpu_check",
        },
        "machine": {
            "device": "NVIDIA H200",
            "gpus": ["NVIDIA H200, 580.159.04, 143771 MiB"],
            "torch": "2.11.0",
            "torch_cuda": "13.0",
            "capability": "9.0",
            "python": "3.12.3",
            "cpus": 16,
            "commit": "abc123",
            "uncommitted_changes": 2,
            "packages": {"numpy": "2.5.2"},
        },
        "steps": {
            "wheels": {
                "status": "ok",
                "installed": ["fastapi==0.165.0"],
                "already_present": ["numpy 2.5.2"],
                "seconds": 2.0,
            },
            "build": {"status": "ok", "path": "service/kernels/similarity.fatbin", "kib": 329.0, "seconds": 3.0},
            "pytest": {
                "status": "failed",
                "tests": 10,
                "failures": 1,
                "errors": 0,
                "skipped": 1,
                "passed": 8,
                "seconds": 50.0,
                "files": ["tests/service/kernels/test_cuda_gpu.py"],
                "summary": "1 failed, 8 passed, 1 skipped in 50s",
                "failed": [{"test": "t::a", "kind": "failure", "message": "assert 1 | 2"}],
                "skip_reasons": [["needs bf16", 1]],
            },
        },
        "sections": {
            "kernel": {
                "status": "ok",
                "seconds": 40.0,
                "rows": kernel_rows,
                "method": {"k": 5, "reps": 25, "warmup": 3, "profile_reps": 10, "numpy_max_scores": 5_591_808},
            },
            "engine": {
                "status": "ok",
                "seconds": 30.0,
                "rows": engine_rows,
                "flops_per_image": 8.73e9,
                "peak_tflops": 790.0,
                "model": {"architecture": "ViT-B-32", "image_size": 224},
                "notes": ["something odd"],
            },
            "preprocess": {
                "status": "ok",
                "seconds": 20.0,
                "arguments": {"photos": 8},
                "table": "| a | b |\n|---|---|\n| 1 | 2 |",
            },
            "serve": {
                "status": "ok",
                "seconds": 80.0,
                "method": {"seconds": 10, "settings": {"CLIPSERVE_ENGINE": "torch"}},
                "runs": [
                    {
                        "similarity": "cuda",
                        "engine": "torch fp16",
                        "startup_s": 12.0,
                        "levels": [
                            {
                                "concurrency": 1,
                                "requests_s": 150.0,
                                "p50_ms": 6.0,
                                "p95_ms": 7.0,
                                "p99_ms": 8.0,
                                "errors": 0,
                                "error_kinds": {},
                                "server_similarity_ms_median": 0.1,
                                "client_cpu": 0.3,
                            },
                            {
                                "concurrency": 128,
                                "requests_s": 900.0,
                                "p50_ms": 120.0,
                                "p95_ms": 150.0,
                                "p99_ms": None,
                                "errors": 2,
                                "error_kinds": {"HTTP 503": 2},
                                "server_similarity_ms_median": None,
                                "client_cpu": 0.9,
                            },
                        ],
                    }
                ],
            },
        },
    }


def table_blocks(markdown: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    previous_was_table = False
    for line in markdown.splitlines():
        is_table = line.startswith("|")
        if is_table:
            if not previous_was_table:
                blocks.append([])
            blocks[-1].append(line)
        previous_was_table = is_table
    return blocks


def cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line)) - 2  # the unescaped pipes, less the two outer ones


def test_every_table_in_the_report_is_well_formed() -> None:
    report = render(canned_results())
    blocks = table_blocks(report)
    assert len(blocks) >= 7  # machine, targets, steps, failed tests, kernel, engine, preprocess, serve
    for block in blocks:
        assert len(block) >= 3, block
        assert re.fullmatch(r"\|(---:?\|)+", block[1]), block[1]
        assert {cells(line) for line in block} == {cells(block[0])}, block


def test_the_report_states_machine_commit_tests_and_each_section() -> None:
    report = render(canned_results())
    for text in [
        "NVIDIA H200, 580.159.04",
        "abc123 (+ 2 files",
        "2.11.0 (CUDA 13.0",
        "t::a",
        "assert 1 \\| 2",
        "1 failed, 8 passed",
        "◀ target",
        "8.73 GFLOP",
        "90,493 images/s",
        "HTTP 503",
        "| a | b |",
        "kernel_us: CudaError",
        "Note: something odd",
    ]:
        assert text in report, text


@pytest.mark.parametrize(
    ("kernel_us", "torch_us", "expected"), [(100.0, 400.0, PASS), (100.0, 300.0, PASS), (100.0, 290.0, FAIL)]
)
def test_the_kernel_target_is_three_times_torch_end_to_end(kernel_us: float, torch_us: float, expected: str) -> None:
    target = evaluate_targets(canned_results(kernel_us=kernel_us, torch_us=torch_us))[0]
    assert target["status"] == expected
    assert target["measured"] == f"{torch_us / kernel_us:.2f}×"


@pytest.mark.parametrize(("rate", "expected"), [(25_000.0, PASS), (20_000.0, PASS), (19_999.0, FAIL)])
def test_the_engine_target_is_twenty_thousand_images_per_second(rate: float, expected: str) -> None:
    assert evaluate_targets(canned_results(engine_rate=rate))[1]["status"] == expected


def test_targets_without_their_rows_are_not_measured_and_say_why() -> None:
    results = canned_results()
    results["sections"]["kernel"] = {"status": "error", "error": "RuntimeError: boom"}
    results["sections"]["engine"]["rows"] = results["sections"]["engine"]["rows"][1:]
    kernel, engine = evaluate_targets(results)
    assert kernel["status"] == engine["status"] == NOT_MEASURED
    assert "RuntimeError: boom" in kernel["detail"]
    assert "something odd" in engine["detail"]
    assert "## Errors" in render(results)


def test_markdown_table_escapes_cells_and_rejects_ragged_rows() -> None:
    assert markdown_table(["a", "b"], [["x|y", None]], "lr") == "| a | b |\n|---|---:|\n| x\\|y | n/a |"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [["only one"]])


# ------------------------------------------------------------------------------------------------ carried wheels


def test_only_missing_packages_are_chosen_plus_one_too_old_for_them() -> None:
    wheels = [
        Wheel(Path(f"{n}.whl"), n, v)
        for n, v in [
            ("fastapi", "0.165.0"),
            ("numpy", "9.9"),
            ("pydantic", "2.14.4"),
            ("typing-extensions", "4.16.0"),
            ("torch", "9.9"),
        ]
    ]
    installed = {"numpy": "2.5.2", "torch": "2.11.0", "typing-extensions": "4.12.0"}
    requirements = {
        "fastapi.whl": ["pydantic>=2.9", "anyio>=4"],
        "pydantic.whl": [
            "typing-extensions>=4.16.0",
            "annotated-types>=0.6",
            "tzdata; sys_platform == 'win32'",
            "email-validator>=2; extra == 'email'",
        ],
        "typing-extensions.whl": [],
    }
    chosen, notes = select_wheels(wheels, installed.get, lambda path: requirements[path.name])
    assert [w.name for w in chosen] == ["fastapi", "pydantic", "typing-extensions"]
    assert any("typing-extensions 4.12.0 is too old for pydantic" in note for note in notes)
    # Unmet and not carried: named, so a failing import on the machine has its explanation in the report.
    assert any("annotated-types>=0.6" in note and "none" in note for note in notes)
    assert any("anyio>=4" in note for note in notes)
    # Requirements for another platform or an extra are not requirements here.
    assert not any("tzdata" in note or "email" in note for note in notes)


def test_a_present_package_of_a_fitting_version_is_never_replaced() -> None:
    wheels = [Wheel(Path("pydantic.whl"), "pydantic", "2.14.4"), Wheel(Path("te.whl"), "typing-extensions", "4.16.0")]
    installed = {"typing-extensions": "4.17.0"}
    chosen, notes = select_wheels(wheels, installed.get, lambda path: ["typing-extensions>=4.16.0"])
    assert [w.name for w in chosen] == ["pydantic"]
    assert notes == []


def build_wheel(directory: Path, distribution: str, version: str, module: str) -> Path:
    """A minimal pure-Python wheel, written by hand (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    stem = f"{distribution.replace('-', '_')}-{version}"
    files = {
        f"{module}.py": f"VERSION = {version!r}\n",
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n",
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(text)},{len(text.encode())}\n" for name, text in files.items())
    files[f"{stem}.dist-info/RECORD"] = record + f"{stem}.dist-info/RECORD,,\n"
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_install_wheels_installs_only_what_is_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "whl"
    wheels.mkdir()
    build_wheel(wheels, "clipserve-gpu-check-probe", "1.0", "clipserve_gpu_check_probe")
    build_wheel(wheels, "numpy", "0.0.1", "numpy_impostor")  # numpy is installed: must not be shadowed
    monkeypatch.setattr(sys, "path", list(sys.path))  # install_wheels activates the site for this process
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(gpu_check_setup, "SMOKE_IMPORTS", ("clipserve_gpu_check_probe", "numpy"))
    site = tmp_path / "site"

    record = gpu_check_setup.install_wheels(wheels, site)

    assert record["status"] == "ok", record
    assert record["installed"] == ["clipserve-gpu-check-probe==1.0"]
    assert record["already_present"][0].startswith("numpy ")
    assert (site / "clipserve_gpu_check_probe.py").is_file()
    assert not (site / "numpy_impostor.py").exists()
    # A fresh interpreter (as every later step is) imports from the site through PYTHONPATH.
    assert record["imports"] == {"clipserve_gpu_check_probe": None, "numpy": None}
    assert str(site) == sys.path[0]


def test_no_wheel_folder_is_a_skip_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check_setup, "SMOKE_IMPORTS", ("json",))
    record = gpu_check_setup.install_wheels(tmp_path / "absent", tmp_path / "site")
    assert record["status"] == "skipped"
    assert record["imports"] == {"json": None}


def test_the_wheel_list_is_pinned_to_the_installed_versions() -> None:
    pins = gpu_wheels.pins({"pytest": "", "numpy": ""})
    assert pins == [f"pytest=={pytest.__version__}", f"numpy=={__import__('numpy').__version__}"]
    # Not installed here: pyproject.toml's requirement, extras and markers dropped.
    assert gpu_wheels.pins({"Not_A_Real.Package": ""}, {"not-a-real-package": "not-a-real-package>=2"}) == [
        "not-a-real-package>=2"
    ]
    with pytest.raises(SystemExit, match="not-a-real-package-xyz"):
        gpu_wheels.pins({"not-a-real-package-xyz": ""})
    requirements = gpu_wheels.pyproject_requirements()
    assert requirements["uvicorn"] == "uvicorn>=0.29"
    assert requirements["open-clip-torch"] == "open_clip_torch>=2.24"
    command = gpu_wheels.pip_download_command(["fastapi==1"], Path(".whl"))
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_17_x86_64", "3.12", "cp"} <= set(command)


# ------------------------------------------------------------------------------------------------ failures


def failing_section(config: Any, recorder: Recorder) -> None:
    recorder.row("rows", {"B": 1})
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_section_that_raises_is_recorded_with_its_rows(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "kernel.json")
    data = run_guarded(failing_section, config_for(dry_run=True, cuda=False, fatbin=tmp_path), recorder)
    assert data["status"] == "error"
    assert "illegal memory access" in data["error"]
    assert "failing_section" in data["traceback"]
    assert json.loads((tmp_path / "kernel.json").read_text())["rows"] == [{"B": 1}]


def test_a_section_that_cannot_run_is_skipped_with_its_reason(tmp_path: Path) -> None:
    def skipping(config: Any, recorder: Recorder) -> None:
        raise SectionSkipped("no CUDA GPU")

    data = run_guarded(skipping, config_for(dry_run=True, cuda=False, fatbin=tmp_path), Recorder())
    assert (data["status"], data["reason"]) == ("skipped", "no CUDA GPU")


def test_a_failed_measurement_leaves_the_row_standing() -> None:
    row: dict[str, Any] = {}
    assert measure(row, "kernel_us", lambda: 1 / 0) is None
    measure(row, "torch_us", lambda: 12.5)
    assert row["torch_us"] == 12.5
    assert row["kernel_us"] is None
    assert row["errors"] == {"kernel_us": "ZeroDivisionError: division by zero"}


def test_profiled_kernels_are_told_apart_by_stream_so_our_cublas_gemm_counts_as_ours() -> None:
    from loadtests.gpu_check_bench import split_kernel_events

    def kernel(name: str, stream: int | None) -> dict[str, Any]:
        return {"cat": "kernel", "name": name, "dur": 1.0, "args": {} if stream is None else {"stream": stream}}

    events = [
        kernel("nvjet_tst_128x64", 13),  # cuBLAS on the driver's stream: ours
        kernel("clipserve_softmax_topk", 13),
        kernel("nvjet_tst_128x64", 7),  # torch's matmul
        kernel("softmax_warp_forward", 7),
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH", "dur": 9.0, "args": {"stream": 13}},
    ]
    ours, theirs = split_kernel_events(events)
    assert [e["name"] for e in ours] == ["nvjet_tst_128x64", "clipserve_softmax_topk"]
    assert [e["name"] for e in theirs] == ["nvjet_tst_128x64", "softmax_warp_forward"]
    # Without streams in the trace: by name, as before.
    ours, theirs = split_kernel_events([kernel("clipserve_softmax_topk", None), kernel("gemm", None)])
    assert ([e["name"] for e in ours], [e["name"] for e in theirs]) == (["clipserve_softmax_topk"], ["gemm"])


def test_preprocess_rows_of_a_killed_section_still_make_its_table() -> None:
    row = {
        "set": "photo 640×480 JPEG q90",
        "images": 8,
        "size": 224,
        "device_decoded": 8,
        "fallbacks": 0,
        "max_levels": 1.0,
        "mean_levels": 0.01,
        "differing": 0.02,
        "min_cosine": None,
        "cpu_images_s": 300.0,
        "device_images_s": 2000.0,
        "device_batched_images_s": 5000.0,
    }
    report = render({"sections": {"preprocess": {"status": "error", "error": "killed", "rows": [row]}}})
    assert "| photo 640×480 JPEG q90 | 8 | 224 |" in report


def test_a_hung_child_is_killed_at_its_limit() -> None:
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    finished = gpu_check_setup.run_streaming(command, timeout=2)
    assert finished.returncode is None
    assert finished.tail == ["started"]
    assert finished.seconds < 20


def test_a_failing_or_hung_section_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process boundary is faked (no GPU here): `run_streaming` plays each section's child process, writing
    the JSON a real child writes, or nothing when it 'hangs'. Everything on this side of it is real."""

    def child(command: list[str], *, timeout: float, prefix: str = "", keep: int = 60) -> Finished:
        name, result = command[command.index("--section") + 1], Path(command[command.index("--result") + 1])
        if name == "kernel":  # hung: killed at its limit before writing anything
            return Finished(None, ["kernel B=1 ..."], timeout)
        if name == "engine":  # a child that crashed hard (segfault) after one row
            result.write_text(json.dumps({"status": "running", "rows": [{"precision": "fp16"}]}))
            return Finished(-11, ["Segmentation fault"], 1.0)
        if name == "preprocess":
            data = run_guarded(failing_section, config_for(dry_run=True, cuda=False, fatbin=tmp_path), Recorder(result))
            return Finished(0, [], data["seconds"])
        result.write_text(json.dumps({"status": "ok", "runs": [], "seconds": 1.0}))
        return Finished(0, [], 1.0)

    monkeypatch.setattr(gpu_check_setup, "run_streaming", child)
    monkeypatch.setattr(gpu_check_setup, "install_wheels", lambda wheels, site: {"status": "skipped"})
    monkeypatch.setattr(gpu_check_setup, "machine_info", lambda: {"cuda_available": True, "device": "Fake GPU"})
    monkeypatch.setattr(gpu_check_setup, "build_kernel", lambda fatbin: {"status": "ok"})
    args = gpu_check.parse_args(["--out", str(tmp_path / "out"), "--skip-tests", "--fatbin", str(tmp_path / "k")])

    assert gpu_check.run_check(args) == 1

    sections = json.loads((tmp_path / "out" / "gpu-report.json").read_text())["sections"]
    assert sections["kernel"]["status"] == "error"
    assert "killed at its" in sections["kernel"]["error"]
    assert sections["engine"]["status"] == "error"
    assert sections["engine"]["rows"] == [{"precision": "fp16"}]
    assert "Segmentation fault" in sections["engine"]["tail"]
    assert "illegal memory access" in sections["preprocess"]["error"]
    assert sections["serve"]["status"] == "ok"
    report = (tmp_path / "out" / "gpu-report.md").read_text()
    assert "### kernel" in report
    assert "### engine" in report


# ------------------------------------------------------------------------------------------------ gpu tests


def test_the_gpu_test_modules_are_found() -> None:
    files = {str(path.relative_to(ROOT)) for path in gpu_check_setup.gpu_test_files()}
    assert "tests/service/kernels/test_cuda_gpu.py" in files
    assert "tests/loadtests/test_gpu_check.py" not in files


def test_junit_results_are_counted(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="1" skipped="1" time="2.5">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="t" name="broken"><error message="fixture failed"/></testcase>'
        '<testcase classname="t" name="later"><skipped message="needs bf16"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = parse_junit(junit)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert counts["failed"] == [
        {"test": "t::bad", "kind": "failure", "message": "assert 1 == 2"},
        {"test": "t::broken", "kind": "error", "message": "fixture failed"},
    ]
    assert counts["skip_reasons"] == [("needs bf16", 1)]


# ------------------------------------------------------------------------------------------------ the script


def test_help_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.gpu_check", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout
    assert "--out" in result.stdout


def test_the_dry_run_runs_every_step_and_section_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [
        sys.executable,
        "-m",
        "loadtests.gpu_check",
        "--dry-run",
        "--out",
        str(out),
        "--fatbin",
        str(tmp_path / "similarity.fatbin"),
        "--wheels",
        str(tmp_path / "no-wheels"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    has_nvcc = shutil.which("nvcc") is not None
    assert result.returncode == (0 if has_nvcc else 1), result.stdout[-5000:] + result.stderr[-3000:]

    results = json.loads((out / "gpu-report.json").read_text())
    assert results["meta"]["total_s"] < 120  # 40 s on a 2-core machine; the budget is 60 s, with slack for CI
    assert results["steps"]["build"]["status"] == ("ok" if has_nvcc else "error")
    assert results["steps"]["pytest"]["status"] == "ok"
    assert results["steps"]["pytest"]["tests"] > 0
    sections = results["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    assert "no CUDA GPU" in sections["kernel"]["kernel_skipped"]
    assert all(row["torch_us"] and row["numpy_us"] for row in sections["kernel"]["rows"])
    assert sections["engine"]["rows"][0]["images_s"] > 0
    assert sections["preprocess"]["rows"]
    [numpy_run] = sections["serve"]["runs"]
    assert numpy_run["similarity"] == "numpy"
    assert all(level["requests"] > 0 and level["errors"] == 0 for level in numpy_run["levels"])
    report = (out / "gpu-report.md").read_text()
    assert "**Dry run**" in report
    assert report.count(f"**{NOT_MEASURED}**") == 2
    assert report in result.stdout
