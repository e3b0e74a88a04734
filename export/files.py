"""Replacing a directory as one step, so a reader never sees a half-written model."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the complete `staging` directory where `target` is, keeping the old one until that succeeded.

    rename() cannot replace a non-empty directory, so the old one is moved aside first (on the same
    filesystem, so each rename is atomic) and moved back if the new one cannot take its place. Readers may
    find no directory for the instant between the two renames, never a mixed or partial one.
    """
    # mkdtemp creates 0700 directories; model servers often run as another user than the exporter.
    staging.chmod(0o755)
    if not target.exists() and not target.is_symlink():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.retired")
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink()
