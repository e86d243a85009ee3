"""One process of a 2-process x 2-device run of the control step (launched by test_control_step.py).

Runs 3 steps of `control_case` on a data=2 x fsdp=2 mesh spanning both
processes; process 0 writes the metrics and the final state for the test to
compare with its one-process run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
    port, process_id, out_dir, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_compilation_cache_dir", cache)
    from sdsup import parallel

    import control_case

    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2})
    history, states = control_case.run(mesh, 3, every_state=False)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "state.npz"), **states[-1])
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump({"history": history, "devices": jax.device_count(), "processes": jax.process_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
