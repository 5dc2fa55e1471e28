# The body shared by slurm/papo_*.sh (sourced, never submitted): environment, the one `srun` of
# `papo-mega train RECIPE --resume auto`, signal forwarding and requeue. docs/scaling.md explains it.
#
# Set by the sourcing script (defaults a user may override with environment variables):
#   RECIPE_DEFAULT   recipe path relative to the repository
#   PRECISION        model.precision override ('' keeps the recipe's)
#   LAYOUT           parallel.* overrides, e.g. "parallel.tp_size=8 parallel.pp_size=4" ('' = recipe's)
#   PAPO_CPU=1       a CPU job: no NCCL/CUDA settings, OMP_NUM_THREADS=1
# Environment variables a user may set at `sbatch` time (sbatch exports the submitting environment):
#   PAPO_REPO        repository checkout (default: the directory sbatch was run from)
#   PAPO_PYTHON      Python to run (default: $PAPO_REPO/.venv/bin/python, else python3;
#                    inside a container: python)
#   RECIPE           recipe instead of RECIPE_DEFAULT
#   RUN_DIR          run.run_dir (default: the recipe's); a requeued job resumes from it
#   DATA             shard root: data.train_shards=$DATA/train, data.eval_shards=$DATA/test (if present)
#   TRAIN_SHARDS, EVAL_SHARDS   the two explicitly (EVAL_SHARDS='' turns evaluation off)
#   INIT_FROM        algo.init_from (an SFT output or converted HF model directory)
#   EXTRA            more dotted overrides, space-separated, e.g. "train.steps=10 train.lr=1e-6"
#   CONTAINER_IMAGE  run the tasks in this image (pyxis/enroot); CONTAINER_MOUNTS: extra mounts
#   MAX_REQUEUES     stop requeueing after this many restarts (default 20)

set -euo pipefail

PAPO_REPO="${PAPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$PAPO_REPO"
RECIPE="${RECIPE:-$RECIPE_DEFAULT}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"

log() { echo "[papo-slurm $(date +%H:%M:%S)] $*"; }

# -- Python: the repository's venv on a bare-metal cluster, the image's python in a container ----
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    PAPO_PYTHON="${PAPO_PYTHON:-python}"
elif [[ -z "${PAPO_PYTHON:-}" ]]; then
    if [[ -x "$PAPO_REPO/.venv/bin/python" ]]; then PAPO_PYTHON="$PAPO_REPO/.venv/bin/python"; else PAPO_PYTHON=python3; fi
fi
# The checkout is importable without installing it (a container image may only hold the dependencies).
export PYTHONPATH="$PAPO_REPO${PYTHONPATH:+:$PYTHONPATH}"

# -- overrides ---------------------------------------------------------------------------------
OVERRIDES=()
[[ -n "${RUN_DIR:-}" ]] && OVERRIDES+=("run.run_dir=$RUN_DIR")
if [[ -n "${DATA:-}" ]]; then
    TRAIN_SHARDS="${TRAIN_SHARDS:-$DATA/train}"
    if [[ -z "${EVAL_SHARDS+set}" && -d "$DATA/test" ]]; then EVAL_SHARDS="$DATA/test"; fi
fi
[[ -n "${TRAIN_SHARDS:-}" ]] && OVERRIDES+=("data.train_shards=$TRAIN_SHARDS")
[[ -n "${EVAL_SHARDS+set}" ]] && OVERRIDES+=("data.eval_shards=${EVAL_SHARDS}")
[[ -n "${INIT_FROM:-}" ]] && OVERRIDES+=("algo.init_from=$INIT_FROM")
[[ -n "${PRECISION:-}" ]] && OVERRIDES+=("model.precision=$PRECISION")
# shellcheck disable=SC2206  # LAYOUT, TINY_OVERRIDES and EXTRA are space-separated lists on purpose
OVERRIDES+=(${LAYOUT:-} ${TINY_OVERRIDES:-} ${EXTRA:-})

# -- environment of the tasks --------------------------------------------------------------------
if [[ "${PAPO_CPU:-0}" == 1 ]]; then
    # One thread per rank: the ranks already fill the allocated cores (gloo backend, no CUDA).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    # Threads per rank = cores Slurm gave the task; torch would otherwise start one per core on
    # every rank (8 ranks x all cores = oversubscription that slows the data loader and NCCL proxies).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on explicitly.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    # Megatron's tensor/sequence-parallel communication overlap relies on kernels being issued to
    # the GPU in program order: one hardware work queue per device.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # A failed or timed-out collective aborts the process (and srun --kill-on-bad-exit the job)
    # instead of leaving every other rank hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Do not let the caching allocator hold tensors of async collectives via record_stream: less
    # memory fragmentation (the Megatron/NeMo default).
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    # Rollout (variable-length generation) and training alternate very different tensor shapes:
    # expandable segments keep the caching allocator from fragmenting into OOM.
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    # WARN prints NCCL's errors and nothing per-communicator; set NCCL_DEBUG=INFO to see the chosen
    # transports (NVLink / InfiniBand / sockets) when debugging bandwidth.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # InfiniBand retry timeout 4.096us * 2^22 (~17 s) rather than NCCL's 2^20: large clusters see
    # transient fabric congestion that would otherwise fail a 32-node collective.
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    # Site-specific, set only when given: the bootstrap/socket interface (e.g. NCCL_SOCKET_IFNAME=ib0
    # or ^docker,lo) and the IB HCAs (e.g. NCCL_IB_HCA=mlx5). NCCL's auto-detection is usually right.
    [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && export NCCL_SOCKET_IFNAME
    [[ -n "${NCCL_IB_HCA:-}" ]] && export NCCL_IB_HCA
fi

# A script may define before_srun (e.g. papo_tiny.sh writes its synthetic shards); it runs once here.
if declare -F before_srun >/dev/null; then before_srun; fi

# -- one srun: every task runs papo-mega train; rendezvous comes from SLURM_* (distributed/launcher.py)
SRUN_ARGS=(--kill-on-bad-exit=1)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    # pyxis: docker/Dockerfile's image (NGC PyTorch 25.11: CUDA, NCCL, TE 2.9 in megatron-core 0.16.1's
    # range; plus megatron-core and our dependencies) - a stock NGC image has no megatron-core.
    SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PAPO_REPO"
                --container-mounts="$PAPO_REPO:$PAPO_REPO${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi
# --resume auto last: argparse takes no positional overrides after an option.
CMD=("$PAPO_PYTHON" -m papo_mega.cli train "$RECIPE" "${OVERRIDES[@]}" --resume auto)
log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks"
log "srun ${SRUN_ARGS[*]} ${CMD[*]}"

# srun runs in the background so that the shell can take signals while it waits: `--signal=B:USR1@T`
# warns only this shell, which forwards USR1 to srun, which passes it to every task. The tasks finish
# their step, checkpoint it and exit 0 (papo_mega/train.py StopRequest); the job is then requeued and
# the next start resumes with --resume auto. TERM (scancel, preemption, the time limit) reaches the
# tasks from Slurm directly; the shell only notes it and keeps waiting so the tasks get KillWait to save.
STOP=""
PENDING=""
on_usr1() { STOP=USR1; PENDING=1; log "USR1: asking the tasks to checkpoint and stop"; kill -USR1 "$SRUN_PID" 2>/dev/null || true; }
on_term() { STOP="${STOP:-TERM}"; PENDING=1; log "TERM: the tasks stop after their step (no requeue)"; }
trap on_usr1 USR1
trap on_term TERM
srun "${SRUN_ARGS[@]}" "${CMD[@]}" &
SRUN_PID=$!
while :; do
    RC=0
    wait "$SRUN_PID" || RC=$?
    if [[ -n "$PENDING" ]]; then PENDING=""; continue; fi  # woken by a trap, not by srun's exit
    break
done
log "srun exited with $RC"

if [[ "$STOP" == USR1 && "$RC" == 0 ]]; then
    if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
        log "stopped before the time limit; not requeueing: restart ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES=$MAX_REQUEUES"
        exit 0
    fi
    log "stopped before the time limit with a checkpoint: requeueing job $SLURM_JOB_ID (resumes with --resume auto)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$RC"
