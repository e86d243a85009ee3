#!/usr/bin/env bash
# Runs N sdsup processes on this machine, joined through jax.distributed on
# 127.0.0.1: the multi-host code path (disjoint input shards, global batches,
# barriers) without a cluster. Each process gets DEVICES_PER_PROCESS CPU devices.
# Exit status 75 (preempted, a checkpoint kept: sdsup.trainer.preemption) starts
# all of them again, up to RETRIES times; they resume from the checkpoint.
#
#   NUM_PROCESSES=2 launch/local_multiprocess.sh --config=configs/scenes.py:smoke --workdir=workdirs/mp
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PYTHON=${PYTHON:-python}
RETRIES=${RETRIES:-3}
RETRY_STATUS=75

run_once() {
  local port=${PORT:-$((20000 + RANDOM % 20000))}
  local pids=() status=0
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
      "$PYTHON" -m sdsup.train --coordinator_address="127.0.0.1:${port}" \
      --num_processes="$NUM_PROCESSES" --process_id="$i" "$@" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  return "$status"
}

for ((attempt = 1; ; attempt++)); do
  status=0
  run_once "$@" || status=$?
  if [[ $status -ne $RETRY_STATUS || $attempt -gt $RETRIES ]]; then
    exit "$status"
  fi
  echo "local_multiprocess.sh: preempted (exit status $RETRY_STATUS); starting again, retry $attempt of $RETRIES" >&2
done
