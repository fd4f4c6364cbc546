"""The environment of a test's subprocess on simulated CPU devices: the suite's XLA flags (tests/conftest.py)
kept, the device count added."""

from __future__ import annotations

import os


def cpu_env(devices: int = 1) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
