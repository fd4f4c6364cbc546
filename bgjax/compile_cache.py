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
    """Cache every compiled program that took at least a second to compile in `cache_dir` (None: off)."""
    if cache_dir is None:
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
