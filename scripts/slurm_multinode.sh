#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one `accelerate launch` per node, DeepSpeed ZeRO-2 by default.
#
#   brainfm config check configs/pretrain/large-3d.yaml --require-data   # before queueing: exit 0 or one error
#   sbatch --nodes 4 scripts/slurm_multinode.sh ldm configs/pretrain/large-3d.yaml
#   ACCELERATE_CONFIG=configs/accelerate/multi-gpu.yaml sbatch --nodes 1 scripts/slurm_multinode.sh vae C
#
# Checkpoints and logs must live on a filesystem shared by all nodes (train.output_dir): the model state is
# written by the global main process only. Re-submitting the same job resumes from the newest COMPLETE
# checkpoint (--resume auto), so preemption costs at most checkpoint_every steps.
#SBATCH --job-name=brainfm-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

STAGE=${1:?usage: slurm_multinode.sh vae|ldm CONFIG.yaml [extra brainfm args]}
CONFIG=${2:?usage: slurm_multinode.sh vae|ldm CONFIG.yaml [extra brainfm args]}
shift 2
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi-node-zero2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHON=${PYTHON:-.venv/bin/python}

NNODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1  # never fetch anything from compute nodes

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# srun starts one launcher per node; SLURM_NODEID gives each its machine rank.
srun --kill-on-bad-exit=1 bash -c "
  $PYTHON -m accelerate.commands.launch \
    --config_file $ACCELERATE_CONFIG \
    --num_machines $NNODES \
    --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    --rdzv_backend static \
    pretrain/$STAGE.py --config $CONFIG --resume auto $*
"
