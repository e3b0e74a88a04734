"""The serving path must run on the slim install: importing it must not need torch (DESIGN.md)."""

import subprocess
import sys

SERVING_MODULES = [
    "service",
    "service.app",
    "service.cli",
    "service.gpu.preprocess",
    "service.gpu.similarity",
    "service.gpu.driver",
    "models.tokenizer",
    "models.preprocess",
    "models.templates",
    "models.manifest",
    "models.demo.config",
    "models.demo.shapes",
    "models.demo.dataset",
    "models.demo.evaluate",
]
HEAVY = ["torch", "torchvision", "open_clip", "transformers", "onnx"]


def test_serving_modules_import_with_torch_unimportable():
    # A None entry in sys.modules makes `import torch` raise ImportError, as on a machine without torch.
    code = "; ".join(
        [
            "import sys",
            *[f"sys.modules[{name!r}] = None" for name in HEAVY],
            *[f"import {module}" for module in SERVING_MODULES],
            "from models.tokenizer import ClipTokenizer",
            "from models.preprocess import ImageTransform, PreprocessConfig",
            "print('ok')",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_serving_path_loads_no_heavy_module():
    code = "; ".join(
        [
            *[f"import {module}" for module in SERVING_MODULES],
            "import sys",
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
