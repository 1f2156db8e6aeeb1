#!/usr/bin/env bash
# DeepSpeed's runner driving OpenMPI: `deepspeed --launcher openmpi` turns the hostfile into
#   mpirun -n <total slots> -hostfile <hostfile> --mca btl ^openib <LAUNCHER_ARGS> -x ... python -u train.py ...
# mpirun (via ssh to each node's orted) starts every rank; dwnet.distributed reads
# OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE and, with no MASTER_ADDR forwarded, lets rank 0
# pick its address (on IFACE) and a free port and broadcasts them with mpi4py.
#
#   HOSTFILE=hostfile CONFIG=ds_configs/dwnet_base.yaml IFACE=eth0 launch/openmpi.sh
#
# Every variable below can be set from the environment; extra arguments go to train.py ("$@").
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-ds_configs/dwnet_base.yaml}
HOSTFILE=$(realpath "${HOSTFILE:-hostfile}")   # the DeepSpeed hostfile is also a valid OpenMPI one
IFACE=${IFACE:-eth0}            # NIC between the nodes: MPI's TCP traffic, NCCL/gloo sockets, rank 0's address
VENV=${VENV:-$PWD/.venv}
SSH_ALIVE_S=${SSH_ALIVE_S:-10}  # mpirun's ssh to a silent (dead, cut off) node gives up after 3 x this
# mpirun reads OMPI_MCA_* from its environment: keepalives on the ssh that starts each node's orted
export OMPI_MCA_plm_rsh_args="${OMPI_MCA_plm_rsh_args:-} -o ServerAliveInterval=$SSH_ALIVE_S -o ServerAliveCountMax=3"
# forwarded to every rank when set (the peer watchdog's bound, the interface check's)
FORWARD=""
for v in DWNET_PEER_TIMEOUT DWNET_IFACE_PROBE_TIMEOUT DWNET_DIST_TIMEOUT; do
    if [[ -n "${!v:-}" ]]; then FORWARD+=" -x $v=${!v}"; fi
done
MPI_EXTRA=${MPI_EXTRA:-}        # more mpirun options, e.g. "--allow-run-as-root" in root containers
DS_EXTRA=${DS_EXTRA:-}          # more deepspeed runner options; a one-host hostfile needs "--force_multi"

[[ -f "$HOSTFILE" ]] || { echo "launch/openmpi.sh: hostfile '$HOSTFILE' not found (see hostfile.example)" >&2; exit 2; }

# -x NAME[=VALUE] exports to every rank: PATH/LD_LIBRARY_PATH so remote nodes find the venv and CUDA
# libraries, the interface choices, and the hostfile for the preflight check.
LAUNCHER_ARGS="--bind-to none --map-by slot \
 --mca btl_tcp_if_include $IFACE --mca oob_tcp_if_include $IFACE \
 -x PATH=$VENV/bin:$PATH -x LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} \
 -x NCCL_SOCKET_IFNAME=$IFACE -x GLOO_SOCKET_IFNAME=$IFACE -x DWNET_MASTER_IFACE=$IFACE \
 -x DWNET_HOSTFILE=$HOSTFILE$FORWARD $MPI_EXTRA"
# set MASTER_ADDR/MASTER_PORT yourself to skip the mpi4py discovery
if [[ -n "${MASTER_ADDR:-}" ]]; then
    LAUNCHER_ARGS+=" -x MASTER_ADDR=$MASTER_ADDR -x MASTER_PORT=${MASTER_PORT:-29500}"
fi

# --master_addr is not passed on to the ranks by this launcher; giving it only spares the runner an
# `ssh <first host> hostname -I` probe
exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --launcher openmpi --launcher_args "$LAUNCHER_ARGS" \
    --master_addr "${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}" $DS_EXTRA \
    train.py --config "$CONFIG" "$@"
