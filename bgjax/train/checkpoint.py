"""Checkpoints through orbax: the train state (sharded, written asynchronously), the data
iterator's position (grain, one file per process) and the meta (the config and the data's
fingerprint, which a resume checks), kept N at a time.

orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: Path, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(meta)), force=True)

    def meta(self, step: int) -> dict:
        """What `save` stored as meta at `step`, without reading the state."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore(self, step: int, abstract_state, data_iterator):
        """The state at `step`, placed as `abstract_state`'s shardings say (any mesh), and the
        data iterator moved to where it was."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (possibly new) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
