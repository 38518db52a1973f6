#!/usr/bin/env bash
# Two machines, one job: run the same command on both, NODE_RANK 0 on the machine at MASTER_ADDR.
#   launch/two_node.sh NODE_RANK MASTER_ADDR -m engine.vqa --shards shards/ --data arrow/ --split rest_val
# NPROC_PER_NODE (default 2) should be a multiple of the shards' tp, so each tensor-parallel group stays on one
# machine and only the data-parallel result gathering crosses the network. Rank 0 (node 0) writes the results.
# MASTER_PORT (default 29500); IFNAME etc. as in launch/env.sh.
set -eo pipefail  # no -u: CANN's set_env.sh reads unset variables
if [ $# -lt 3 ]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
node_rank=$1 master_addr=$2
shift 2
. "$(dirname "$0")/env.sh"
exec torchrun --nnodes 2 --node-rank "$node_rank" --nproc-per-node "${NPROC_PER_NODE:-2}" \
  --master-addr "$master_addr" --master-port "${MASTER_PORT:-29500}" "$@"
