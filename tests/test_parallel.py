"""Meshes over fake devices, and a real two-process run on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from sdsup import parallel

HERE = os.path.dirname(os.path.abspath(__file__))


def test_resolve_axes_fills_minus_one():
    assert parallel.resolve_axes({"data": -1}, 8) == (("data", 8), ("fsdp", 1))
    assert parallel.resolve_axes({"data": 2, "fsdp": -1}, 8) == (("data", 2), ("fsdp", 4))
    assert parallel.resolve_axes({"data": 1, "fsdp": 1}, 1)[0] == ("data", 1)


@pytest.mark.parametrize("axes, devices, message", [
    ({"data": 3}, 8, "needs 3 devices, but 8 are available"),
    ({"data": -1, "fsdp": 3}, 8, "not divisible by 3"),
    ({"data": -1, "fsdp": -1}, 8, "at most one mesh axis may be -1"),
    ({"data": 0}, 8, "must be positive or -1"),
    ({"model": 2}, 8, "unknown mesh axes"),
])
def test_mesh_that_does_not_fit_is_a_clear_error(axes, devices, message):
    with pytest.raises(parallel.MeshError, match=message):
        parallel.resolve_axes(axes, devices)


def test_mesh_on_8_and_1_devices():
    assert jax.device_count() == 8
    mesh = parallel.make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.batch_divisor(mesh) == 8
    mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_single_process_initialize_is_a_no_op(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(parallel.MeshError, match="needs num_processes and process_id"):
        parallel.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(parallel.MeshError, match="outside"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_into_one_global_batch(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(port), str(i),
                               str(tmp_path / f"tfds{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = sorted(outs, key=lambda o: o["process"])
    assert a["processes"] == b["processes"] == 2 and a["devices"] == 4
    assert a["mesh"]["data"] == 4 and a["global_shape"] == [8, 16, 16, 3]
    assert not set(a["local_indices"]) & set(b["local_indices"])
    assert a["global_sum"] == b["global_sum"] == pytest.approx(a["local_sum"] + b["local_sum"])
