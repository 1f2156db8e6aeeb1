#!/usr/bin/env bash
# torchrun (torch.distributed.run): run THIS SAME COMMAND on every node; the c10d rendezvous at
# RDZV_ENDPOINT (any reachable host:port, usually the first node) assigns node and global ranks.
# No ssh involved. One node: NNODES=1 uses --standalone (a private rendezvous on localhost).
#
#   NPROC_PER_NODE=8 launch/torchrun.sh --opts data.batch_size=128 engine.precision=bf16   # tiny
#   NNODES=2 RDZV_ENDPOINT=node1:29400 CONFIG=ds_configs/dwnet_base.yaml IFACE=eth0 launch/torchrun.sh  # on both nodes
#
# Every variable below can be set from the environment; extra arguments go to train.py ("$@").
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-ds_configs/dwnet_tiny.yaml}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}   # host:port of the rendezvous (multi-node)
RDZV_ID=${RDZV_ID:-dwnet-$(id -un)}  # same on every node, different per concurrent job
IFACE=${IFACE:-}
VENV=${VENV:-$PWD/.venv}

# torchrun's workers inherit this shell's environment: export the interface choices here
if [[ -n "$IFACE" ]]; then export NCCL_SOCKET_IFNAME=$IFACE GLOO_SOCKET_IFNAME=$IFACE; fi
if [[ -n "${HOSTFILE:-}" ]]; then export DWNET_HOSTFILE=$(realpath "$HOSTFILE"); fi   # optional preflight check

if [[ "$NNODES" == 1 && -z "$RDZV_ENDPOINT" ]]; then
    RDZV=(--standalone)
else
    [[ -n "$RDZV_ENDPOINT" ]] || { echo "launch/torchrun.sh: set RDZV_ENDPOINT=host:port for NNODES=$NNODES" >&2; exit 2; }
    RDZV=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
fi

exec "$VENV/bin/torchrun" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${RDZV[@]}" \
    train.py --config "$CONFIG" "$@"
