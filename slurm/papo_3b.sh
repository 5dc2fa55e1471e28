#!/bin/bash
# PAPO-G on a Qwen2.5-VL-3B-class model: 1 node x 8 H100 80GB (precision and layout from the recipe).
# Submit from the repository root:   sbatch slurm/papo_3b.sh
# Overrides at submit time, e.g.:     RUN_DIR=/lustre/runs/3b DATA=/lustre/shards INIT_FROM=/lustre/sft_3b \
#                                     CONTAINER_IMAGE=/lustre/images/papo-mega.sqsh sbatch slurm/papo_3b.sh
# The image: docker/Dockerfile (NGC PyTorch 25.11 with TE 2.9 + megatron-core 0.16.1; docker/README.md).
# All variables: slurm/common.sh. Launch, resume and signals: docs/scaling.md.
#SBATCH --job-name=papo-3b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# Cores per rank: the main process, NCCL/TE proxy threads, up to 4 math-verify reward workers
# and data.num_workers loader processes; 8 x 12 = 96 fits 96- to 128-core H100 nodes.
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 this long before the time limit: enough to finish the step in progress and write a checkpoint.
#SBATCH --signal=B:USR1@600

RECIPE_DEFAULT=examples/papo_g_3b.yaml
PRECISION="${PRECISION-}"
# Parallel layout: '' keeps the recipe's parallel.* settings; e.g. LAYOUT="parallel.tp_size=1".
LAYOUT="${LAYOUT-}"
source "${PAPO_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
