#!/bin/bash
# The tiny VLM (examples/tiny_cpu.yaml) at toy size on CPU: 2 tasks on one node, no GPUs, ~1 minute.
# A smoke test of the whole Slurm path (srun launch, rendezvous, checkpoints, TensorBoard, signals,
# requeue) on any cluster, and what tests/slurm/test_slurm.py submits to a local slurmctld.
#   sbatch slurm/papo_tiny.sh                      # from the repository root
#   RUN_DIR=/tmp/tiny DATA=/tmp/tiny/data sbatch slurm/papo_tiny.sh
# All variables: slurm/common.sh. Launch, resume and signals: docs/scaling.md.
#SBATCH --job-name=papo-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 a minute before the time limit: a toy step and its checkpoint take seconds.
#SBATCH --signal=B:USR1@60

PAPO_CPU=1
RECIPE_DEFAULT=examples/tiny_cpu.yaml
PRECISION="${PRECISION-}"
LAYOUT="${LAYOUT-}"
RUN_DIR="${RUN_DIR:-runs/slurm_tiny}"
DATA="${DATA:-$RUN_DIR/data}"
EVAL_SHARDS="${EVAL_SHARDS-$DATA/test}"
# Toy size (as tests/distributed/test_demo.py): 2 RL steps of 4 prompts x 2 answers, a checkpoint
# after each, evaluation on 4 questions before the first and after the last step.
TINY_OVERRIDES="${TINY_OVERRIDES-train.steps=2 algo.prompts_per_step=4 rollout.n=2 rollout.max_new_tokens=8
    train.global_batch_size=8 train.micro_batch_size=4 algo.eval_samples=4 algo.eval_k=1 checkpoint.save_every=1}"

before_srun() {  # synthetic shards, written once (a requeued job finds them)
    local split num
    for split in train test; do
        num=40; [[ "$split" == test ]] && num=8
        if [[ ! -f "$DATA/$split/manifest.json" ]]; then
            log "writing $num synthetic $split samples to $DATA/$split"
            "$PAPO_PYTHON" tools/make_synthetic.py --split "$split" --num "$num" --tasks compare_size --out "$DATA/$split"
        fi
    done
}
source "${PAPO_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
