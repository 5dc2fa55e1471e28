#!/bin/bash
# PAPO-G on a Qwen2.5-VL-72B-class model: 4 nodes x 8 H100 80GB, fp8 (Transformer Engine).
# Submit from the repository root:   sbatch slurm/papo_72b.sh
# Overrides at submit time, e.g.:     RUN_DIR=/lustre/runs/72b DATA=/lustre/shards INIT_FROM=/lustre/sft_72b \
#                                     CONTAINER_IMAGE=/lustre/images/papo-mega.sqsh sbatch slurm/papo_72b.sh
# The image: docker/Dockerfile (NGC PyTorch 25.11 with TE 2.9 + megatron-core 0.16.1; docker/README.md).
# All variables: slurm/common.sh. Launch, resume and signals: docs/scaling.md.
#SBATCH --job-name=papo-72b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# Cores per rank: the main process, NCCL/TE proxy threads, up to 4 math-verify reward workers
# and data.num_workers loader processes; 8 x 12 = 96 fits 96- to 128-core H100 nodes.
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 this long before the time limit: enough to finish the step in progress and write a checkpoint.
#SBATCH --signal=B:USR1@1800

RECIPE_DEFAULT=examples/papo_g_72b.yaml
PRECISION="${PRECISION-fp8}"
# Parallel layout, in this one variable: the one `papo-mega plan --model qwen2.5-vl-72b --gpus 32
# --config examples/papo_g_72b.yaml` ranks best and the only one that fits (78.8 GB on the busiest
# stage of an H100's 85.5 GB physical, 95% planned for; GPU runtime terms included, some assumed):
# TP4 inside each half node (the vision tower splits at most 4 ways), PP8 over the 4 nodes, DP1.
LAYOUT="${LAYOUT-parallel.tp_size=4 parallel.pp_size=8}"
source "${PAPO_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
