#!/usr/bin/env bash
# Meta-train on every worker of a TPU pod slice: the same command runs on all hosts, JAX
# detects the pod, tasks are sharded over all chips, and process 0 writes the outputs.
#
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=/mnt/shared/runs/pod bash scripts/launch_tpu_pod.sh
#
# WORKDIR must be a filesystem every worker sees (checkpoints are read by all of them on
# resume). Extra arguments are passed to experiments.main (e.g. --config.meta.meta_batch_size=64).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/default.py}
REPO=${REPO:-metamd-jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && python -m experiments.main --distributed --config $CONFIG --workdir $WORKDIR $*"
