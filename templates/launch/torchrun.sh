#!/bin/bash
# torchrun launch of a LightningCLI template on NNODES machines x NPROC GPUs. Run the same command on every
# machine with its own NODE_RANK (0 on the machine at MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example.org bash launch/torchrun.sh
# Run it from the folder holding the script (scaffold.py's DEST). Lightning detects torchrun
# (TorchElasticEnvironment); --nproc-per-node must equal trainer.devices and --nnodes trainer.num_nodes.
set -euo pipefail
NNODES=${NNODES:-2}
NPROC=${NPROC:-8}
NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 on the first machine, 1 on the second, ...}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first machine address}
MASTER_PORT=${MASTER_PORT:-29500}
SCRIPT=${SCRIPT:-causal_lm.py}
# scaffold.py's config.yaml (model, data, run length) when there is one, then multinode.yaml's trainer settings over
# it: a later --config overrides an earlier one key by key.
CONFIGS=(--config configs/multinode.yaml)
if [ -f config.yaml ]; then CONFIGS=(--config config.yaml "${CONFIGS[@]}"); fi

torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$SCRIPT" fit "${CONFIGS[@]}" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" "$@"
