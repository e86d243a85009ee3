"""Orbax checkpoints of one stage: train state, data-iterator state, config, step.

Saves are asynchronous (training continues while arrays are written) and
atomic (orbax writes to a temporary directory and renames it), so a crash or
a NaN never leaves a half-written "latest" checkpoint. Restores read into
abstract targets that carry the *current* shardings, so a checkpoint written
on one mesh restores onto another (maxdiffusion #379).

The data-iterator state is the same on every process (each process reads its
own slice of the same shuffled stream and all advance in lockstep), so the
JSON item that process 0 writes serves them all.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from sdsup.errors import SdsupError


class CheckpointMismatchError(SdsupError):
    """A stage's checkpoint does not fit the state the current config builds."""


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "config"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return self._manager.all_steps()

    def save(self, step: int, state: Any, data_state: Optional[dict] = None,
             config: Optional[dict] = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(json.dumps(config or {}, default=str))),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, dict, int]:
        """(state, data_state, step) from `step` (default: the latest).

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings (as
        from `abstract_like`); the restored arrays take those shardings.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, TypeError) as e:
            # Typically the model or optimiser in the config changed since the checkpoint was written.
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit the state this config builds "
                f"(was the config changed since it was written?): {str(e).splitlines()[0][:300]}. "
                f"Use a new --workdir, or delete {self.directory} to start this stage over.") from e
        return restored["state"], dict(restored["data"] or {}), step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` (arrays or abstract) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
