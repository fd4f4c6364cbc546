"""JAX's persistent compilation cache for the `bgjax` commands: the second run of a command with the same
shapes loads its compiled programs instead of compiling them again.

The cache lives in `$BGJAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/bgjax/jax` (`~/.cache/bgjax/jax`);
`--no-compile-cache` (or BGJAX_COMPILE_CACHE="") turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "BGJAX_COMPILE_CACHE"


def default_dir() -> Path | None:
    if ENV in os.environ:
        return Path(os.environ[ENV]) if os.environ[ENV] else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bgjax" / "jax"


def enable(cache_dir: Path | None) -> None:
    """Cache compiled programs in `cache_dir` (None: off). Which ones is JAX's own setting: those that took at
    least a second to compile, or `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`."""
    if cache_dir is None:
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
