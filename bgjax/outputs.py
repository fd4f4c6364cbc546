"""Output folders: a writer refuses a folder that already holds files unless told to overwrite, and then
empties it first, so nothing stale from an earlier run (an old grid, shards of another dataset) survives;
`fresh_output` also removes a failed command's partial output."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


def claim_output(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Make `out` an empty folder: refuse (FileExistsError naming it) when it holds files and not `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(f"{out}: not empty ({shown}); choose a new folder, or pass {flag} to replace "
                              f"what is there")
    if entries and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise FileExistsError(f"{out}: is the current folder or holds it; {flag} would delete it, choose another")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def fresh_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """`claim_output`, then on any failure inside the block remove what was written (OUT was empty when it
    began), so a failed command leaves nothing behind."""
    out = Path(out)
    existed = out.is_dir()
    claim_output(out, overwrite)
    try:
        yield out
    except BaseException:
        if existed:
            claim_output(out, overwrite=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise
