"""Atomic writes, the one implementation every module uses.

A file or folder is built under a temp name beside its destination (same filesystem, so the
final rename is atomic) and renamed into place only once complete: a reader, a resumed run or
a crash never sees half of one. Temp names start with ".tmp-" and are removed on error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path`; on success rename it into place, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid keeps two processes writing the same file from renaming each other's partial temp file
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 text to a temp file beside `path`, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def atomic_dir(final: Path) -> Path:
    """A fresh, empty temp folder beside `final`; commit_dir() moves it into place (or use atomic_folder)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename folder `tmp` onto `final`, replacing an existing `final` whole.

    The old folder is renamed aside first and deleted only after the new one is in place, so
    `final` is always either the complete old folder or the complete new one, never half-deleted.
    """
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, 0o755)  # mkdtemp creates it 0o700; the result is an ordinary shared folder
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}.{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the old folder back rather than leave nothing at `final`
            os.replace(old, final)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_folder(final: Path):
    """Yield a temp folder beside `final`; on success it replaces `final` (commit_dir), on error it is removed."""
    final = Path(final)
    tmp = atomic_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a commit


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
