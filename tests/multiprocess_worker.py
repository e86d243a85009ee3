"""One process of a simulated multi-host run (launched by test_parallel.py).

Each process owns 2 CPU devices, joins the run through
`parallel.initialize_distributed`, reads its own shard of the scenes with the
input pipeline, assembles the global batch on a 4-device mesh and reduces it.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402


def main():
    port, process_id, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from sdsup import parallel
    from sdsup.data import pipeline, registry, tokenizers

    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mesh = parallel.make_mesh({"data": -1})
    config = ConfigDict(dict(name="scenes", data_dir=data_dir, image_size=16, seed=0,
                             num_train=32, num_validation=4, num_test=4))
    builder = registry.prepare(registry.SCENES, config)
    source = registry.data_source(registry.SCENES, builder, "train")
    ds = pipeline.train_dataset(source, tokenizer=tokenizers.WordTokenizer.scenes(64), global_batch_size=8,
                                seed=3, process_index=jax.process_index(), process_count=jax.process_count(),
                                num_threads=0, keep_metadata=True)
    local = next(iter(ds))
    batch = parallel.global_batch(local, mesh)
    total = jax.jit(lambda b: jnp.sum(b["image"].astype(jnp.float32)))(batch)
    print(json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "local_indices": [int(i) for i in local["index"]],
        "local_sum": float(local["image"].astype(np.float64).sum()),
        "global_shape": list(batch["image"].shape), "global_sum": float(total),
    }), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
