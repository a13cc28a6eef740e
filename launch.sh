#!/usr/bin/env bash
# Launch an rpc_train job with torchrun: every process becomes an RPC worker, rank 0 drives.
#
#   ./launch.sh [hydra overrides...]           e.g. ./launch.sh model=convnet pipeline.micro_batches=8
#   ./launch.sh --help | --cfg job | --info    show the config without starting any process
#
# Environment:
#   NPROC          processes on this machine (default 3: a driver and two stage workers)
#   NNODES         machines in the job (default 1)
#   NODE_RANK      this machine's index, 0..NNODES-1 (default 0)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, required when NNODES > 1
#   RUN_DIR        output directory (default outputs/DATE/TIME-XXXXXX, shared by all ranks)
#   MAX_RESTARTS   times torchrun restarts the whole group after a rank fails (default 0); each
#                  restart resumes from the run's newest checkpoint (checkpoint.resume=auto)
#   PYTHON         interpreter to use (default python3)
#   RDZV_PORT      port of the rendezvous that launch.sh names under Slurm (default 29500)
#   LAUNCH_DRY_RUN 1: check the values and the config, print the run dir and the torchrun command
#                  line, and start nothing (exit 0)
# Inside a Slurm job (srun starts launch.sh once per node: docs/slurm.sbatch, docs/slurm.md), what
# is not set comes from the allocation: NNODES=$SLURM_NNODES, NODE_RANK=$SLURM_NODEID,
# RDZV_ENDPOINT=<first host of the step's nodes>:$RDZV_PORT, RUN_DIR=outputs/slurm-$SLURM_JOB_ID.
# Exit status: 0 when every rank succeeded, 2 for a bad value found before any process starts,
# otherwise non-zero (a configuration error found mid-run, by the driver, exits 1).
# With mode=serve, SIGTERM or Ctrl-C drains the front end and every rank exits 0; a second one forces.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

is_count() { [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= 1 )); }

RDZV_PORT=${RDZV_PORT:-29500}
LAUNCH_DRY_RUN=${LAUNCH_DRY_RUN:-0}
[[ $LAUNCH_DRY_RUN == [01] ]] || die "LAUNCH_DRY_RUN=$LAUNCH_DRY_RUN: must be 0 (launch) or 1 (print the command only)"

# Inside a Slurm job the allocation fills in what is not set. srun sets SLURM_NNODES and
# SLURM_NODEID per job step, so the rendezvous host is taken from the step's node list too.
in_slurm=0
if [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_NNODES:-} ]]; then
  in_slurm=1
  if [[ -z ${NNODES:-} ]]; then
    # Without srun (in an sbatch script or a salloc shell) this node would be the only one to
    # join and would wait out the rendezvous timeout; two tasks on a node would share a rank.
    if (( SLURM_NNODES > 1 )) && [[ -z ${SLURM_STEP_ID:-} ]]; then
      die "SLURM_NNODES=$SLURM_NNODES outside a job step:" \
          "start launch.sh once per node with srun --ntasks-per-node=1 (see docs/slurm.sbatch)"
    fi
    step_nodes=${SLURM_STEP_NUM_NODES:-$SLURM_NNODES}
    if [[ -n ${SLURM_STEP_NUM_TASKS:-} && $SLURM_STEP_NUM_TASKS != "$step_nodes" ]]; then
      die "SLURM_STEP_NUM_TASKS=$SLURM_STEP_NUM_TASKS on $step_nodes nodes:" \
          "launch.sh runs once per node (srun --ntasks-per-node=1)"
    fi
  fi
  NNODES=${NNODES:-$SLURM_NNODES}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  # The nodes agree on one run dir without talking (on a shared filesystem: docs/slurm.md).
  RUN_DIR=${RUN_DIR:-outputs/slurm-$SLURM_JOB_ID}
fi

# host:port of the rendezvous in a Slurm job: the step's first node hosts it, so every node names
# the same one without talking. Slurm compresses node lists (node[07-08]); scontrol expands them.
slurm_rendezvous() {
  local var=SLURM_STEP_NODELIST hosts
  if ! is_count "$RDZV_PORT" || (( RDZV_PORT > 65535 )); then
    die "RDZV_PORT=$RDZV_PORT: must be a port number from 1 to 65535 (the rendezvous on the first node)"
  fi
  [[ -n ${SLURM_STEP_NODELIST:-} ]] || var=SLURM_JOB_NODELIST
  [[ -n ${!var:-} ]] || die "SLURM_JOB_NODELIST is not set: no rendezvous host (set RDZV_ENDPOINT=host:port)"
  command -v scontrol >/dev/null ||
    die "scontrol not found on PATH: it expands $var=${!var} into the rendezvous host" \
        "(or set RDZV_ENDPOINT=host:port)"
  hosts=$(scontrol show hostnames "${!var}" 2>&1) ||
    die "scontrol show hostnames ${!var} ($var) failed: ${hosts##*$'\n'}"
  echo "${hosts%%$'\n'*}:$RDZV_PORT"
}

NPROC=${NPROC:-3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python3}

is_count "$NPROC" || die "NPROC=$NPROC: must be a positive integer (processes on this machine)"
is_count "$NNODES" || die "NNODES=$NNODES: must be a positive integer (machines in the job)"
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  die "NODE_RANK=$NODE_RANK: must be an integer from 0 to NNODES-1=$((NNODES - 1))"
fi
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] ||
  die "MAX_RESTARTS=$MAX_RESTARTS: must be 0 or a positive integer (restarts after a failure)"

# Introspection flags compose and print the config in one process; nothing is launched.
for arg in "$@"; do
  case $arg in
    --help|-h|--hydra-help|--cfg|-c|--info|-i|--resolve|--info=*|--cfg=*)
      exec "$PYTHON" -m rpc_train.train "$@" ;;
  esac
done

# A sweep runs in one process that starts a fresh torchrun world per job (rpc_train/sweep.py).
for arg in "$@"; do
  if [[ $arg == -m || $arg == --multirun ]]; then
    day=multirun/$(date +%Y-%m-%d)
    mkdir -p "$day"
    sweep_dir=$(mktemp -d "$day/$(date +%H-%M-%S)-XXXXXX")
    exec "$PYTHON" -m rpc_train.sweep "$@" "hydra.sweep.dir=$sweep_dir"
  fi
done

# One machine: torchrun's standalone rendezvous on a free local port. Several: the c10d one.
if (( NNODES == 1 )); then
  rdzv=(--standalone)
else
  if [[ -z ${RDZV_ENDPOINT:-} ]] && (( in_slurm )); then
    RDZV_ENDPOINT=$(slurm_rendezvous) || exit 2
  fi
  [[ -n ${RDZV_ENDPOINT:-} ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the c10d rendezvous)"
  rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT")
fi

# Check the config once, here, before any rank starts (one line and exit 2 on a bad value). It
# prints the environment the ranks must start with, NAME=value a line: runtime.allocator's
# LD_PRELOAD and tuning (rpc_train/runtime/allocator.py), which only take effect at exec.
rank_env=$(WORLD_SIZE=$((NPROC * NNODES)) "$PYTHON" -m rpc_train.preflight "$@")
while IFS= read -r setting; do
  if [[ -n $setting ]]; then export "${setting?}"; fi
done <<< "$rank_env"

# One run dir for all ranks, made here: two launches in the same second still get two. A dry
# run makes nothing (mktemp -u only names one).
if [[ -z ${RUN_DIR:-} ]]; then
  day=outputs/$(date +%Y-%m-%d)
  if (( LAUNCH_DRY_RUN )); then
    RUN_DIR=$(mktemp -d -u "$day/$(date +%H-%M-%S)-XXXXXX")
  else
    mkdir -p "$day"
    RUN_DIR=$(mktemp -d "$day/$(date +%H-%M-%S)-XXXXXX")
  fi
fi
(( LAUNCH_DRY_RUN )) || mkdir -p "$RUN_DIR"

# Each rank sets its own intra-op thread count (runtime.threads); this only quiets torchrun.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store per attempt: torchrun's shared one keeps the failed attempt's keys,
# and a restarted group's init_rpc reads them and hangs (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

serving=0
for arg in "$@"; do [[ $arg == mode=serve ]] && serving=1; done
# A serving job's torchrun passes SIGTERM and SIGINT on to its ranks, which drain (see below).
agent=torch.distributed.run
(( serving )) && agent=rpc_train.serve.agent
run=("$PYTHON" -m "$agent" "${rdzv[@]}" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
     -m rpc_train.train "hydra.run.dir=$RUN_DIR" "$@")
if (( LAUNCH_DRY_RUN )); then
  echo "run dir: $RUN_DIR"
  [[ -z $rank_env ]] || echo "environment: ${rank_env//$'\n'/ }"
  printf 'command:'; printf ' %q' "${run[@]}"; echo
  exit 0
fi
echo "rpc_train: run dir $RUN_DIR" >&2

if (( ! serving )); then
  exec "${run[@]}"
fi

# Serving drains on SIGTERM or Ctrl-C, sent here, to torchrun, to any rank, or to all at once
# (docs/serving.md): torchrun runs through rpc_train.serve.agent, which passes the signal on to
# the ranks instead of killing them, and every rank turns it into one drain on the front end, so
# every rank and torchrun exit 0. torchrun runs in a session of its own so that Ctrl-C reaches
# this script alone. A second signal here forces the job down (a drain stuck on a hung replica).
setsid "${run[@]}" &
torchrun_pid=$!
signals=0
# shellcheck disable=SC2329  # called by the trap below
stop() {
  signals=$((signals + 1))
  if (( signals == 1 )); then
    echo "rpc_train: draining (a second Ctrl-C or SIGTERM forces the job down)" >&2
    kill -TERM "$torchrun_pid" 2>/dev/null || true
  else
    echo "rpc_train: forcing the job down: killing torchrun and its ranks" >&2
    pkill -KILL -P "$torchrun_pid" 2>/dev/null || true  # the ranks, each in a session of its own
    kill -KILL "$torchrun_pid" 2>/dev/null || true
  fi
}
trap stop TERM INT
while true; do  # a trapped signal ends `wait` early: wait again until torchrun has exited
  wait "$torchrun_pid" && status=0 || status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$status"
