"""Built-in label sets a saved classifier can be made from with one call (`{"builtin": "imagenet-1k"}`).

`imagenet-1k`: the 1,000 ImageNet class names as the CLIP paper's zero-shot evaluation words them (the list
open_clip ships as IMAGENET_CLASSNAMES; a test checks the committed file against it), with the paper's 80
templates. Two names appear twice ("missile", "sunglasses"): the list keeps ImageNet's class order and indices.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_ASSETS = Path(__file__).parent / "assets"
BUILTINS = {"imagenet-1k": ("imagenet-1k.txt", "imagenet")}  # name -> (class-name file, template preset)


class UnknownLabelSet(ValueError):
    pass


@cache
def builtin_label_set(name: str) -> tuple[tuple[str, ...], str]:
    """(labels, template preset) of a built-in label set."""
    if name not in BUILTINS:
        raise UnknownLabelSet(f"unknown built-in label set {name!r}; built-ins: {', '.join(BUILTINS)}")
    file, preset = BUILTINS[name]
    labels = tuple(line for line in (_ASSETS / file).read_text(encoding="utf-8").splitlines() if line)
    return labels, preset
