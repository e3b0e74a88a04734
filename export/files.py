"""Replacing a directory as one step, so a reader never sees a half-written model."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>
RETIRED_ID_LENGTH = 8
STALE_STAGING_S = 24 * 3600


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE).

    Returns False where that is not available (another OS, an old kernel or C library, a filesystem that does
    not support it), so the caller can fall back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    # Unsupported here (EPERM: some seccomp sandboxes refuse the call outright); a real permission problem
    # resurfaces in the fallback's own renames.
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink()


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the complete `staging` directory where `target` is, keeping the old one until that succeeded.

    rename() cannot replace a non-empty directory. On Linux the two are swapped in one atomic step, so readers
    see the old model or the new one and nothing else, even if the process dies halfway. Elsewhere the old one
    is moved aside first (on the same filesystem, so each rename is atomic) and moved back if the new one
    cannot take its place; readers may then find no directory for the instant between the two renames, and a
    crash in that instant leaves the old model as `.<name>.<id>.retired` (`restore_retired` puts it back).
    """
    # mkdtemp creates 0700 directories; model servers often run as another user than the exporter.
    staging.chmod(0o755)
    if not target.exists() and not target.is_symlink():
        staging.rename(target)
        return
    if _exchange(staging, target):
        _remove(staging)  # now the old model
        return
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex[:RETIRED_ID_LENGTH]}.retired")
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    # Renamed before deleting, so a crash halfway through the deletion cannot leave a partial copy that
    # `restore_retired` would take for a whole one.
    doomed = retired.with_name(retired.name.removesuffix(".retired") + ".deleting")
    retired.rename(doomed)
    _remove(doomed)


def restore_retired(target: Path, must_contain: str) -> Path | None:
    """Moves back a model that a crash left aside (see `replace_directory`), if `target` is missing.

    Only `.<target name>.<8 hex digits>.retired` directories holding `must_contain` qualify: names may contain
    dots, so a looser pattern for "clip" would pick up "clip.v2"'s leftovers, and a copy whose deletion was
    under way when the crash came may be incomplete.
    """
    if target.exists() or target.is_symlink():
        return None
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{{RETIRED_ID_LENGTH}}}\.retired")
    candidates = [
        path
        for path in target.parent.iterdir()
        if pattern.fullmatch(path.name) and path.is_dir() and (path / must_contain).is_file()
    ]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: path.stat().st_mtime)
    newest.rename(target)
    return target


@contextlib.contextmanager
def staged_directory(target: Path, must_contain: str, progress: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A new, empty directory beside `target` to write into; it replaces `target` when the block completes and is
    deleted when the block raises, so a failed run leaves the previous `target` as it was.

    Before that, a `target` that a crash left aside is put back (`restore_retired`), and staging directories of
    killed runs are deleted once a day old (a younger one may belong to a run still going).
    """
    if restore_retired(target, must_contain) and progress is not None:
        progress(f"restored {target.name} from an export that was interrupted while swapping it in")
    for leftover in target.parent.glob(f".{target.name}.staging-*"):
        if time.time() - leftover.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(leftover, ignore_errors=True)
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
