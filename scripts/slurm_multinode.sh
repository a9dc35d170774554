#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one `accelerate launch` per node, DeepSpeed ZeRO-2 by default.
#
#   brainfm config check configs/pretrain/large-3d.yaml --require-data   # before queueing: exit 0 or one error
#   sbatch --nodes 4 scripts/slurm_multinode.sh ldm configs/pretrain/large-3d.yaml
#   ACCELERATE_CONFIG=configs/accelerate/multi-gpu.yaml sbatch --nodes 1 scripts/slurm_multinode.sh vae C
#
# Dry run: `scripts/slurm_multinode.sh --dry-run ldm C` prints the command every node would run (one line per
# node, machine rank 0..N-1) from the same SLURM variables, and starts nothing. Inside an allocation
# (`salloc --nodes 2` or the job itself) it shows exactly what srun would start; outside one, set
# SLURM_JOB_NODELIST, SLURM_NNODES and SLURM_JOB_ID by hand.
#
# Processes per node: GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "h100:8"), else 8.
# Checkpoints and logs must live on a filesystem shared by all nodes (train.output_dir): the model state is
# written by the global main process only. Re-submitting the same job resumes from the newest COMPLETE
# checkpoint (--resume auto), so preemption costs at most checkpoint_every steps. A node lost mid-run makes the
# others stop after train.collective_timeout_s with one error line; srun --kill-on-bad-exit ends the job step.
#SBATCH --job-name=brainfm-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage="usage: slurm_multinode.sh [--dry-run] vae|ldm CONFIG.yaml [extra brainfm args]"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
STAGE=${1:?$usage}
CONFIG=${2:?$usage}
shift 2
if [[ "$STAGE" != vae && "$STAGE" != ldm ]]; then
  echo "slurm_multinode.sh: error: stage must be vae or ldm, got '$STAGE'" >&2
  exit 2
fi
for var in SLURM_JOB_NODELIST SLURM_NNODES SLURM_JOB_ID; do
  if [[ -z "${!var:-}" ]]; then
    echo "slurm_multinode.sh: error: $var is not set (run under sbatch/salloc, or set it for --dry-run)" >&2
    exit 2
  fi
done

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi-node-zero2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=$SLURM_NNODES
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [[ ${#HOSTS[@]} -ne $NNODES ]]; then
  echo "slurm_multinode.sh: error: SLURM_JOB_NODELIST names ${#HOSTS[@]} host(s) but SLURM_NNODES=$NNODES" >&2
  exit 2
fi
MAIN_ADDR=${HOSTS[0]}
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1  # never fetch anything from compute nodes

# accelerate's arguments before the machine rank, then the script and its arguments after it
LAUNCHER=(
  "$PYTHON" -m accelerate.commands.launch
  --config_file "$ACCELERATE_CONFIG"
  --num_machines "$NNODES"
  --num_processes "$((NNODES * GPUS_PER_NODE))"
  --main_process_ip "$MAIN_ADDR"
  --main_process_port "$MAIN_PORT"
  --rdzv_backend static
)
SCRIPT=("pretrain/$STAGE.py" --config "$CONFIG" --resume auto "$@")

WORKDIR=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# $NNODES node(s) x $GPUS_PER_NODE process(es), main process $MAIN_ADDR:$MAIN_PORT, in $WORKDIR," \
       "env OMP_NUM_THREADS=$OMP_NUM_THREADS HF_HUB_OFFLINE=1"
  for rank in "${!HOSTS[@]}"; do
    printf '%s:' "${HOSTS[$rank]}"
    printf ' %q' "${LAUNCHER[@]}" --machine_rank "$rank" "${SCRIPT[@]}"
    printf '\n'
  done
  exit 0
fi

cd "$WORKDIR"
# srun starts one launcher per node; SLURM_NODEID gives each its machine rank (escaped: expanded on the node).
srun --kill-on-bad-exit=1 bash -c "exec $(printf '%q ' "${LAUNCHER[@]}") --machine_rank \$SLURM_NODEID \
$(printf '%q ' "${SCRIPT[@]}")"
