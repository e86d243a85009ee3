"""Orbax checkpoints of one stage: train state, data-iterator state, config, step.

Saves are asynchronous (training continues while arrays are written) and
atomic (orbax writes to a temporary directory and renames it), so a crash or
a NaN never leaves a half-written "latest" checkpoint. Restores read into
abstract targets that carry the *current* shardings, so a checkpoint written
on one mesh restores onto another (maxdiffusion #379).

Faults (docs/reliability.md):
- A checkpoint that cannot be read (a truncated or missing array file, a
  deleted item, garbage metadata, an empty step directory) is skipped with a
  warning naming what is wrong, and the stage resumes from the newest intact
  one. Only when an older intact one is used are the unreadable newer ones
  moved aside, to `<step>.unusable` beside them: orbax would otherwise refuse
  to write that step again, and its clean-up of old checkpoints would delete
  them. With no intact checkpoint at all nothing is moved and the error names
  the directory. sdsup deletes nothing itself (orbax removes checkpoints
  beyond `keep_checkpoints`, and its own half-written temporary directory of
  a step it writes again).
- A checkpoint of another model (the config changed) is a mismatch, not
  damage: an error, never a silent fall-back to an older checkpoint.
- A save that fails (disk full, permissions) stops the run with one line
  naming the step and directory; the previous checkpoint stays intact.

The data-iterator state is the same on every process (each process reads its
own slice of the same shuffled stream and all advance in lockstep), so the
JSON item that process 0 writes serves them all.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from typing import Any, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sdsup.errors import SdsupError

# Test-only: seconds by which every checkpoint's data item is delayed in the background writer, so that a
# test can kill or signal the process while an asynchronous save is in flight (tests/test_faults*.py).
SLOW_WRITES_VARIABLE = "SDSUP_TEST_SLOW_CHECKPOINT_WRITES"
# Where an unreadable checkpoint goes when an older intact one is used: beside it, under a name orbax ignores.
UNUSABLE_SUFFIX = ".unusable"
# The JSON files of a step that orbax reads before any array: the state's tree and the data-iterator state.
METADATA_FILES = ("state/_METADATA", "data/metadata")


class CheckpointMismatchError(SdsupError):
    """A stage's checkpoint does not fit the state the current config builds."""


class NoIntactCheckpointError(SdsupError):
    """A stage has checkpoints, but none of them can be read."""


class CheckpointWriteError(SdsupError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class DiskFullError(SdsupError):
    """The disk filled up while a stage trained (its metrics, pictures or checkpoints)."""


def complete_steps(directory: str) -> List[int]:
    """The steps of the complete checkpoints in `directory` (orbax's finalised ones), oldest first."""
    try:
        return sorted(ocp.path.step.checkpoint_steps(directory))
    except Exception:  # noqa: BLE001 - only for messages: an unreadable directory has none
        return []


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) is "no space left on device".

    Python writes raise OSError(ENOSPC); TensorStore's array writes raise a
    ValueError whose text carries the OS error instead.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of the error it was raised from, innermost first: orbax wraps TensorStore's (which names
    the array and the file) in a generic one."""
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {(lines[0] if lines else '')[:limit]}"


def _json_problem(path: str, name: str) -> Optional[str]:
    try:
        with open(path) as f:
            json.load(f)
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, ValueError) as e:
        return f"{name} is not valid JSON ({type(e).__name__}: {str(e)[:100]})"
    return None


def _slowed(handler: ocp.JsonCheckpointHandler, delay_seconds: float) -> ocp.JsonCheckpointHandler:
    """`handler` with its writes delayed in the background thread (SLOW_WRITES_VARIABLE). The method is replaced on
    the instance: orbax finds a handler for JsonSave arguments by its exact class, so a subclass would not do."""
    write = handler._save_fn

    async def slow_write(x, directory):
        await asyncio.sleep(delay_seconds)
        await write(x, directory)

    handler._save_fn = slow_write
    return handler


def _item_handlers() -> dict:
    delay = float(os.environ.get(SLOW_WRITES_VARIABLE) or 0)
    data = ocp.JsonCheckpointHandler()
    return {"state": ocp.StandardCheckpointHandler(), "data": _slowed(data, delay) if delay > 0 else data,
            "config": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        # Handlers named up front, so that a step's metadata can be read (and checked) before its arrays.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        self._saving: Optional[int] = None  # the step of the save that may still be in flight
        self._failed = False

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return self._manager.all_steps()

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Optional[dict] = None,
             config: Optional[dict] = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(json.dumps(config or {}, default=str))),
        )
        # The previous asynchronous save must have finished (orbax would wait for it anyway); its failure
        # surfaces here, named as its own step's.
        self.wait()
        self._saving = step
        self._guard(lambda: self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        self._guard(self._manager.wait_until_finished)

    def close(self) -> None:
        """Waits for the save in flight and closes; a write failure already raised is not raised again."""
        reported = self._failed
        try:
            self.wait()
        except CheckpointWriteError:
            if not reported:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the save's failure was reported already
                if not self._failed:
                    raise

    def _guard(self, fn) -> None:
        """Runs a saving call; a failure of the save in flight becomes a CheckpointWriteError."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of a write is reported the same way
            self._failed = True
            raise self._write_error(e) from e

    def _write_error(self, error: BaseException) -> CheckpointWriteError:
        step = self._saving
        what = "no space left on device" if is_disk_full(error) else _first_line(error)
        intact = [s for s in complete_steps(self.directory) if s != step]
        previous = (f"the previous checkpoint (step {max(intact)}) is intact" if intact
                    else "there is no earlier checkpoint")
        action = "free space" if is_disk_full(error) else "fix the cause"
        return CheckpointWriteError(
            f"cannot write checkpoint step {step} to {self.directory}: {what}; {previous}. "
            f"To resume, {action}, then run the same command again.")

    # -- restoring ------------------------------------------------------------------------
    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, dict, int]:
        """(state, data_state, step) from `step`, default the newest intact checkpoint.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings (as
        from `abstract_like`); the restored arrays take those shardings.
        Unreadable checkpoints are skipped with a warning (see the module's
        docstring); a checkpoint of another model raises CheckpointMismatchError.
        """
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        skipped = []  # (step, what is wrong)
        for candidate in candidates:
            problem, restored = self._try_restore(candidate, abstract_state)
            if problem is None:
                if skipped:
                    self._set_aside([s for s, _ in skipped])
                return restored["state"], dict(restored["data"] or {}), candidate
            logging.warning("checkpoint step %d in %s is unusable (%s); trying an older one",
                            candidate, self.directory, problem)
            skipped.append((candidate, problem))
        listing = "; ".join(f"step {s}: {p}" for s, p in skipped)
        raise NoIntactCheckpointError(
            f"no intact checkpoint in {self.directory} ({listing}). Nothing was changed; move that directory "
            f"away (or delete it) to start this stage over.")

    def _try_restore(self, step: int, abstract_state: Any):
        """(None, restored) or (what is wrong, None); agreed by every process."""
        problem, restored = self.check_metadata(step, abstract_state), None
        if problem is None:
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ))
            except Exception as e:  # noqa: BLE001 - whatever TensorStore or json raise on damaged files
                problem = f"it cannot be read: {_first_line(e)}"
        if jax.process_count() > 1:
            # A damaged file may be one only some processes read; all must resume from the same step.
            failed = multihost_utils.process_allgather(np.int32(problem is not None))
            if np.any(failed) and problem is None:
                problem, restored = "another process cannot read it", None
        return problem, restored

    def check_metadata(self, step: int, abstract_state: Any) -> Optional[str]:
        """What is wrong with step `step`'s directory and metadata, or None; without reading arrays.

        Raises CheckpointMismatchError when the metadata is readable but
        describes another model (other names, shapes or dtypes).
        """
        path = os.path.join(self.directory, str(step))
        missing = [item for item in ("state", "data") if not os.path.isdir(os.path.join(path, item))]
        if missing:
            if not os.listdir(path):
                return "its directory is empty (a crash while it was created?)"
            return f"item {' and '.join(repr(m) for m in missing)} is missing"
        for name in METADATA_FILES:
            problem = _json_problem(os.path.join(path, name), name)
            if problem:
                return problem
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - garbage metadata raises json, KeyError or TensorStore errors
            return f"its arrays cannot be opened: {_first_line(e)}"
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return "its metadata is empty"
        saved = {k: (tuple(v.shape), str(v.dtype)) for k, v in ocp.tree.to_flat_dict(tree).items()}
        wanted = {k: (tuple(v.shape), str(v.dtype)) for k, v in ocp.tree.to_flat_dict(abstract_state).items()}
        if saved != wanted:
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit the state this config builds "
                f"(was the config changed since it was written?): {_tree_difference(saved, wanted)}. "
                f"Use a new --workdir, or delete {self.directory} to start this stage over.")
        return None

    def _set_aside(self, steps: List[int]) -> None:
        """Moves unusable step directories to `<step>.unusable[.n]` (process 0), so orbax neither trips over nor
        deletes them."""
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target, n = source + UNUSABLE_SUFFIX, 0
                while os.path.exists(target):
                    n += 1
                    target = f"{source}{UNUSABLE_SUFFIX}.{n}"
                os.rename(source, target)
                logging.warning("moved the unusable checkpoint %s to %s (kept for inspection)", source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()


def _tree_difference(saved: dict, wanted: dict) -> str:
    """The first differences between two {path: (shape, dtype)} trees, for a one-line message."""
    name = lambda key: "/".join(str(k) for k in key)
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    parts = []
    if changed:
        k = changed[0]
        parts.append(f"{name(k)} is {saved[k][0]} {saved[k][1]} in the checkpoint, {wanted[k][0]} {wanted[k][1]} "
                     f"now ({len(changed)} arrays differ)")
    if only_saved:
        parts.append(f"{len(only_saved)} arrays only in the checkpoint (e.g. {name(only_saved[0])})")
    if only_wanted:
        parts.append(f"{len(only_wanted)} arrays only in the new state (e.g. {name(only_wanted[0])})")
    return "; ".join(parts)


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` (arrays or abstract) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
