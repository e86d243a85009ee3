"""The ALDM control step on one process's 2 x 4 mesh (data x fsdp) matches one device (SDSUP_ALL_TESTS=1).

The default run checks the sharded step's numbers on data=2 x fsdp=2 across two processes
(tests/test_control_step.py::test_two_processes_match_one_process) and compiles it on this 2 x 4 mesh from
shapes alone; this compile of the whole step at fsdp=4 costs the suite over two minutes, so it runs with
the extended tests.
"""

import jax
import pytest

import control_case
from sdsup import parallel
from test_control_step import _assert_same


@pytest.fixture(scope="module")
def one_device():
    return control_case.run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), 1)


def test_one_step_on_data_2_x_fsdp_4_matches_one_device(one_device):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    assert mesh.devices.size == 8
    history, states = control_case.run(mesh, 1)
    _assert_same(history, states, one_device[0], one_device[1])
