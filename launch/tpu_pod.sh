#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: the same command on every worker, JAX finds
# the pod topology itself (--distributed_auto).
#
#   TPU_NAME=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh setup
#   TPU_NAME=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh train \
#       --config=configs/scenes.py --workdir=gs://my-bucket/sdsup/scenes
#
# `setup` copies this checkout to every worker and installs sdsup with the
# TPU extras; `train` runs sdsup.train there. The workdir should be a bucket
# (or a shared filesystem) that every worker can write. DRY_RUN=1 prints the
# commands instead of running them.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-sdsup}
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${@@Q}"; else "$@"; fi; }
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  setup)
    run gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" \
      "$TPU_NAME:~/$REMOTE_DIR" --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "cd ~/$REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu]'"
    ;;
  train)
    shift
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$REMOTE_DIR && . .venv/bin/activate && python -m sdsup.train --distributed_auto $args"
    ;;
  *)
    echo "usage: $0 setup | train --config=... --workdir=..." >&2
    exit 2
    ;;
esac
