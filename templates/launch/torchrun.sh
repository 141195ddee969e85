#!/bin/bash
# torchrun launch of a LightningCLI template on NNODES machines x NPROC GPUs. Run the same command on every
# machine with its own NODE_RANK (0 on the machine at MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example.org bash launch/torchrun.sh
# Lightning detects torchrun (TorchElasticEnvironment); --nproc-per-node must equal trainer.devices and --nnodes
# must equal trainer.num_nodes.
set -euo pipefail
NNODES=${NNODES:-2}
NPROC=${NPROC:-8}
NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 on the first machine, 1 on the second, ...}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first machine address}
MASTER_PORT=${MASTER_PORT:-29500}
SCRIPT=${SCRIPT:-causal_lm.py}

torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$SCRIPT" fit --config configs/multinode.yaml --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" "$@"
