#!/usr/bin/env bash
# A published run on a SLURM cluster of 8-GPU nodes: one task per node, each running
# examples/scaling/launch_torchrun.sh (the planner's prediction, then megalite-train).
#
#   sbatch --nodes 4 examples/scaling/launch_slurm.sh narayanan-1.7b       # 32 GPUs
#   sbatch --nodes 384 examples/scaling/launch_slurm.sh narayanan-1008b    # 3072 GPUs
#
# The node count each run needs: python examples/scaling/runs.py --list.
#SBATCH --job-name=megalite-scaling
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}" NNODES="$SLURM_NNODES" NPROC_PER_NODE=8
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec bash "$0" "$@"' \
    "$ROOT/examples/scaling/launch_torchrun.sh" "$@"
