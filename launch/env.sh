# Source before torchrun (`. launch/env.sh`): per-backend environment for the engine's launches.
#   IFNAME=eth0      the network interface the ranks reach each other on (multi-node; any backend).
#                    Sets GLOO_SOCKET_IFNAME (gloo also carries the engine's result gathering on NPU/GPU),
#                    NCCL_SOCKET_IFNAME and HCCL_SOCKET_IFNAME; a value you set yourself wins.
#   ASCEND_HOME=...  the CANN install whose set_env.sh is sourced when present (NPU).
if [ -n "${IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IFNAME}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IFNAME}"
  export HCCL_SOCKET_IFNAME="${HCCL_SOCKET_IFNAME:-$IFNAME}"
fi
_cann_env="${ASCEND_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
# shellcheck disable=SC1090
[ -f "$_cann_env" ] && . "$_cann_env"
unset _cann_env
