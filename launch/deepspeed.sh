#!/usr/bin/env bash
# DeepSpeed's own launcher. One node: spawns NUM_GPUS ranks locally. Several nodes: reads the
# hostfile and starts one deepspeed.launcher.launch per node over pdsh/ssh, which spawns that
# node's ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT exported to each).
#
#   NUM_GPUS=8 launch/deepspeed.sh --opts data.batch_size=128 engine.precision=bf16      # tiny, 1 node
#   HOSTFILE=hostfile CONFIG=ds_configs/dwnet_base.yaml IFACE=eth0 launch/deepspeed.sh  # base, 2 nodes
#
# Every variable below can be set from the environment; extra arguments go to train.py ("$@").
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-ds_configs/dwnet_tiny.yaml}
HOSTFILE=${HOSTFILE:-}          # empty: this node only; else DeepSpeed hostfile ("node1 slots=8")
NUM_GPUS=${NUM_GPUS:-8}         # ranks on this node when HOSTFILE is empty
MASTER_PORT=${MASTER_PORT:-29500}
IFACE=${IFACE:-}                # NIC the nodes reach each other on (eth0, ib0, bond0...); empty: auto
VENV=${VENV:-$PWD/.venv}        # sourced on every node before the ranks start (same path everywhere)
SSH_PORT=${SSH_PORT:-}          # sshd port on the nodes when it is not 22
SSH_ALIVE_S=${SSH_ALIVE_S:-10}  # ssh gives up on a silent node after 3 x this many seconds
DS_EXTRA=${DS_EXTRA:-}          # more deepspeed runner options (e.g. "--include node1:0-3@node2")

if [[ -z "$HOSTFILE" ]]; then
    # single node: no ssh, no pdsh; the ranks inherit this shell's environment
    exec "$VENV/bin/deepspeed" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank $DS_EXTRA \
        train.py --config "$CONFIG" "$@"
fi

[[ -f "$HOSTFILE" ]] || { echo "launch/deepspeed.sh: hostfile '$HOSTFILE' not found (see hostfile.example)" >&2; exit 2; }
HOSTFILE=$(realpath "$HOSTFILE")
# rank 0 runs on the first host of the hostfile: it hosts the rendezvous
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}

# pdsh starts a fresh login shell on each node: nothing exported here reaches the ranks except
# PYTHON*, NCCL*, UCX*, MV2*, MLFLOW* and the KEY=VALUE lines of .deepspeed_env (./ and ~/).
# We hand DeepSpeed a generated copy (DS_ENV_FILE) = your .deepspeed_env files + what we add.
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/dwnet-deepspeed-env.XXXXXX")
trap 'rm -f "$ENV_FILE"' EXIT
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
    if [[ -f "$f" ]]; then grep '=' "$f" >> "$ENV_FILE" || true; fi
done
{
    echo "DWNET_HOSTFILE=$HOSTFILE"                    # preflight: world size vs slots, host names
    if [[ -n "${DS_ACCELERATOR:-}" ]]; then echo "DS_ACCELERATOR=$DS_ACCELERATOR"; fi
    for v in DWNET_DIST_TIMEOUT DWNET_PEER_TIMEOUT DWNET_IFACE_PROBE_TIMEOUT; do
        if [[ -n "${!v:-}" ]]; then echo "$v=${!v}"; fi
    done
    if [[ -n "$IFACE" ]]; then
        echo "NCCL_SOCKET_IFNAME=$IFACE"                # NCCL bootstrap + socket transport
        echo "GLOO_SOCKET_IFNAME=$IFACE"                # gloo (CPU collectives, object gathers)
    fi
} >> "$ENV_FILE"
export DS_ENV_FILE=$ENV_FILE
# a node that dies or drops off the network sends nothing: without keepalives pdsh's ssh to it
# waits for TCP's own timeout (many minutes) after every rank has already stopped
export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=${SSH_ALIVE_S:-10} -o ServerAliveCountMax=3"

# --venv_script: `source .venv/bin/activate` on each node first (PATH: the venv's ninja, deepspeed)
# --no_local_rank: ranks read LOCAL_RANK from the environment instead of a --local_rank argument
"$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --launcher pdsh \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --venv_script "$VENV/bin/activate" --no_local_rank ${SSH_PORT:+--ssh_port "$SSH_PORT"} $DS_EXTRA \
    train.py --config "$CONFIG" "$@"
