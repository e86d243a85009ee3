#!/usr/bin/env bash
# Runs N sdsup processes on this machine, joined through jax.distributed on
# 127.0.0.1: the multi-host code path (disjoint input shards, global batches,
# barriers) without a cluster. Each process gets DEVICES_PER_PROCESS CPU devices.
#
#   NUM_PROCESSES=2 launch/local_multiprocess.sh --config=configs/scenes.py:smoke --workdir=workdirs/mp
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    "$PYTHON" -m sdsup.train --coordinator_address="127.0.0.1:${PORT}" \
    --num_processes="$NUM_PROCESSES" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
