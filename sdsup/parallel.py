"""Devices, hosts and meshes.

- `initialize_distributed`: joins a multi-process run (`jax.distributed`);
  a no-op for one process.
- `make_mesh`: a `Mesh` from config axes such as {data: -1, fsdp: 4}; -1 takes
  the remaining devices, and a product that does not match the device count is
  a clear error.
- `global_batch`: each process's local batch -> one global array per field,
  sharded over the batch axes (`jax.make_array_from_process_local_data`).
- `DevicePrefetch`: keeps a few global batches in flight and remembers the
  data-iterator state that belongs to each, so a checkpoint records the
  state of the batches the model has actually consumed.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Iterator, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdsup.errors import SdsupError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both


class MeshError(SdsupError, ValueError):
    pass


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           auto: bool = False,
                           heartbeat_timeout_s: Optional[int] = None) -> bool:
    """Joins a multi-process JAX run; returns whether one was joined.

    Explicit arguments win, then the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. `auto=True` lets JAX detect the
    cluster itself (TPU pods, SLURM, Open MPI). With none of these, this is a
    single-process run and nothing happens.

    `heartbeat_timeout_s` (default JAX's, 100 s) bounds how long the other
    processes wait when one of them dies: after that long without its
    heartbeats the coordination service declares it dead, and JAX ends every
    other process (it aborts, naming the dead task; docs/reliability.md).
    """
    env = os.environ
    timeouts = {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)} if heartbeat_timeout_s else {}
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise MeshError("a coordinator address needs num_processes and process_id too "
                            "(flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise MeshError(f"process_id {process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
        return True
    if auto:
        jax.distributed.initialize(**timeouts)
        return True
    return False


def resolve_axes(axes: Mapping[str, int], num_devices: int) -> Tuple[Tuple[str, int], ...]:
    """Fills one -1 axis with the remaining devices and checks the product."""
    unknown = [name for name in axes if name not in MESH_AXES]
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; allowed: {MESH_AXES}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    fill = [name for name, size in sizes.items() if size == -1]
    bad = [f"{name}={size}" for name, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise MeshError(f"mesh axis sizes must be positive or -1: {', '.join(bad)}")
    if len(fill) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise MeshError(f"mesh {dict(axes)}: {num_devices} devices are not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {dict(axes)} needs {math.prod(sizes.values())} devices, "
                        f"but {num_devices} are available")
    return tuple(sizes.items())


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    """A mesh over all devices (or `devices`) with axes (data, fsdp)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_axes(dict(axes), len(devices))
    shape = tuple(size for _, size in resolved)
    try:
        # Topology-aware device order where JAX knows the interconnect.
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, tuple(name for name, _ in resolved))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """This process's part of a batch -> global arrays sharded over the batch axes.

    Non-array fields (caption strings) stay on the host and are dropped here.
    """
    out = {}
    for name, value in local.items():
        if not isinstance(value, np.ndarray) or value.dtype == object or value.dtype.kind in "US":
            continue
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


class DevicePrefetch:
    """Puts the next `size` batches on the mesh ahead of use, tracking iterator state."""

    def __init__(self, iterator: Iterator, mesh: Mesh, size: int = 2):
        self._it, self._mesh, self._size = iterator, mesh, max(1, size)
        self._queue = collections.deque()
        self._state = self._it.get_state()

    def __iter__(self):
        return self

    def _fill(self):
        while len(self._queue) < self._size:
            local = next(self._it)
            self._queue.append((global_batch(local, self._mesh), self._it.get_state()))

    def __next__(self) -> dict:
        self._fill()
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self) -> dict:
        """The underlying iterator's state after the last batch returned."""
        return self._state

    def close(self) -> None:
        """Stops the underlying iterator's worker processes, if it has any (grain's `mp_prefetch`)."""
        self._queue.clear()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
