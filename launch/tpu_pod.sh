#!/usr/bin/env bash
# Runs launch/main.py on every worker of a Cloud TPU VM pod slice (untested here: no TPU on the dev machines).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a bash launch/tpu_pod.sh experiments/sdxl.py gs://bucket/runs/sdxl \
#       --config.batch_size=256
#
# Every worker runs the same command; JAX finds the other workers from the TPU metadata
# (jax.distributed.initialize() is called when TPU_WORKER_HOSTNAMES lists several hosts). The workdir must be
# shared storage (a GCS bucket) so that all hosts write one checkpoint and auto-resume finds it.
# Assumes the repository is checked out at ~/t2i on every worker with its venv (.venv) installed.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/t2i && source .venv/bin/activate &&
  python -m launch.main --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee -a /tmp/t2i_train.log"
