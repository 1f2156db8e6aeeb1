#!/usr/bin/env bash
# Plain OpenMPI, no DeepSpeed runner: mpirun starts NP ranks over the hostfile's slots (ssh to
# each node). dwnet.distributed reads OMPI_COMM_WORLD_* and the MASTER_ADDR/MASTER_PORT given here.
#
#   NP=8  HOSTFILE=hostfile.one CONFIG=ds_configs/dwnet_tiny.yaml launch/mpirun.sh --opts ...
#   NP=16 HOSTFILE=hostfile     CONFIG=ds_configs/dwnet_base.yaml IFACE=eth0 launch/mpirun.sh
#
# Every variable below can be set from the environment; extra arguments go to train.py ("$@").
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-ds_configs/dwnet_base.yaml}
HOSTFILE=$(realpath "${HOSTFILE:-hostfile}")
NP=${NP:-$(awk '!/^[[:space:]]*(#|$)/ {sub(/.*slots=/, "", $2); n += $2} END {print n}' "$HOSTFILE")}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}  # rank 0's node
MASTER_PORT=${MASTER_PORT:-29500}
IFACE=${IFACE:-eth0}            # NIC between the nodes
VENV=${VENV:-$PWD/.venv}
SSH_ALIVE_S=${SSH_ALIVE_S:-10}  # mpirun's ssh to a silent (dead, cut off) node gives up after 3 x this
# mpirun reads OMPI_MCA_* from its environment: keepalives on the ssh that starts each node's orted
export OMPI_MCA_plm_rsh_args="${OMPI_MCA_plm_rsh_args:-} -o ServerAliveInterval=$SSH_ALIVE_S -o ServerAliveCountMax=3"
# forwarded to every rank when set (the peer watchdog's bound, the interface check's)
FORWARD=""
for v in DWNET_PEER_TIMEOUT DWNET_IFACE_PROBE_TIMEOUT DWNET_DIST_TIMEOUT; do
    if [[ -n "${!v:-}" ]]; then FORWARD+=" -x $v=${!v}"; fi
done
MPI_EXTRA=${MPI_EXTRA:-}        # e.g. "--allow-run-as-root --oversubscribe"

# --map-by slot: ranks 0..7 on the first host, 8..15 on the second (LOCAL_RANK = GPU index)
# --bind-to none: leave every core to the rank's data-loading threads
# -x: forwarded to every rank (remote shells do not inherit this one's environment)
exec mpirun -np "$NP" -hostfile "$HOSTFILE" --map-by slot --bind-to none \
    --mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE" \
    -x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT" \
    -x PATH="$VENV/bin:$PATH" -x LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" \
    -x NCCL_SOCKET_IFNAME="$IFACE" -x GLOO_SOCKET_IFNAME="$IFACE" -x DWNET_HOSTFILE="$HOSTFILE" \
    $FORWARD $MPI_EXTRA \
    "$VENV/bin/python" -u train.py --config "$CONFIG" "$@"
