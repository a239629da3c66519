#!/usr/bin/env bash
# Multi-GPU / multi-node launch with SLURM (one process per node, all local GPUs per process).
# Untested here: the dev machines have no GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/multi_gpu.sh experiments/sd15.py /shared/runs/sd15
#   bash launch/multi_gpu.sh experiments/sd15.py /tmp/sd15       # single node, outside SLURM
#
# Under SLURM, jax.distributed.initialize() reads the coordinator and process ids from SLURM_* variables
# (launch/main.py calls it when SLURM_NTASKS > 1). The workdir must be on storage shared by all nodes.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?usage: multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: multi_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  srun --ntasks-per-node=1 python -m launch.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
else
  python -m launch.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
fi
