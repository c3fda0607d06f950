#!/usr/bin/env bash
# GPT-2 small on a SLURM cluster: one task per node, each task runs torchrun for its node's GPUs.
#
#   sbatch --nodes 4 examples/train_gpt2_slurm.sh                  # DP over 32 GPUs
#   TP=2 PP=2 sbatch --nodes 4 examples/train_gpt2_slurm.sh        # 3D: TP2 x PP2 x DP8
#
# Environment knobs and extra arguments are those of examples/train_gpt2_torchrun.sh (DATA_PATH,
# TP, PP, VPP, OUT); the first node of the allocation hosts the rendezvous.
#SBATCH --job-name=megalite-gpt2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# Preemption: SIGTERM to every task's processes 5 minutes before the time limit (the training
# processes save and exit 0, --exit-signal-handler), and the job goes back in the queue when
# preempted; it resumes from the newest checkpoint (--load = --save).
#SBATCH --signal=TERM@300
#SBATCH --requeue
set -euo pipefail
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# The whole list first: `| head -n 1` could end scontrol with SIGPIPE, which pipefail makes fatal.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}" NNODES="$SLURM_NNODES"
# One srun task per node; SLURM_NODEID becomes torchrun's node rank inside each task.
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec bash "$0" "$@"' \
    "$ROOT/examples/train_gpt2_torchrun.sh" "$@"
