"""The device mesh and where each array lives on it.

Params get logical axis names from their shape (a conv kernel is (h, w, embed, mlp), a dense
kernel or embedding table (embed, mlp), everything else unnamed); `config.mesh.rules` maps
logical names to mesh axes. With the default rules, `fsdp > 1` shards every kernel's input
dimension (FSDP: params, gradients and optimizer state split, gathered per layer by XLA) and
`tensor > 1` its output dimension. A dimension the mesh axis does not divide stays whole.
Batches are split over `data` x `fsdp`. With data, fsdp and tensor all > 1, a kernel is split over
fsdp x tensor on its tensor dimension instead, around an XLA partitioner bug (docs/mesh_bug.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH = PartitionSpec(("data", "fsdp"))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"mesh: fsdp x tensor = {fsdp * tensor} does not divide {len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh: data x fsdp x tensor = {data * fsdp * tensor}, but there are {len(devices)} devices")
    # Auto axes: XLA propagates shardings through the model from the params and the batch.
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_axes(shape: tuple[int, ...]) -> tuple[str | None, ...]:
    if len(shape) == 4:
        return (None, None, "embed", "mlp")
    if len(shape) == 2:
        return ("embed", "mlp")
    return (None,) * len(shape)


def _size(mesh: Mesh, axis) -> int:
    return int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))


def spec(shape: tuple[int, ...], mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> PartitionSpec:
    to_mesh = dict(rules)
    axes = []
    for name, size in zip(logical_axes(shape), shape, strict=True):
        axis = to_mesh.get(name) if name else None
        axes.append(axis if axis and _size(mesh, axis) > 1 and size % _size(mesh, axis) == 0 else None)
    if all(mesh.shape[a] > 1 for a in AXES) and {"fsdp", "tensor"} <= set(axes):
        # XLA's SPMD partitioner (docs/mesh_bug.md) computes wrong gradients through a kernel sharded
        # over fsdp on one dimension and tensor on another when the batch is split over data x fsdp:
        # such a kernel is split over fsdp x tensor on its tensor dimension instead (else tensor only).
        i = axes.index("tensor")
        both = ("fsdp", "tensor") if shape[i] % _size(mesh, ("fsdp", "tensor")) == 0 else "tensor"
        axes = [both if j == i else None if a == "fsdp" else a for j, a in enumerate(axes)]
    return PartitionSpec(*axes)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, str | None]]):
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, spec(tuple(np.shape(x)), mesh, rules)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global batch from each process's rows (process i holds rows [i*n, (i+1)*n) of the batch axis)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def put(tree, shardings):
    """Host arrays -> global arrays laid out as `shardings` (each process supplies its own shards)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: x[index]),
                        tree, shardings)
