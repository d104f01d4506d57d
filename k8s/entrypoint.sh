#!/bin/sh
# One node of a gan-train job: torchrun with the static rendezvous (--nnodes N --node-rank i --master-addr A; see
# README "Faults and resume" for why not c10d), the node's place in the job read from the environment, gan-train's
# Hydra overrides passed on as "$@" (never re-split or re-quoted, so values with spaces, quotes or $ arrive intact).
#
#   GAN_NNODES, GAN_NPROC_PER_NODE        set by gan-launch on every target
#   node rank    GAN_NODE_RANK, else JOB_COMPLETION_INDEX (Indexed Job, TrainJob), else PET_NODE_RANK (Trainer v2),
#                else RANK (PyTorchJob: the pod's node rank)
#   master       GAN_MASTER_ADDR (Indexed Job: pod 0's DNS name), else MASTER_ADDR (PyTorchJob), else PET_MASTER_ADDR
#   port         GAN_MASTER_PORT, else MASTER_PORT, else PET_MASTER_PORT
#   GAN_MAX_RESTARTS                      torchrun --max-restarts (default 0)
# The same script runs a pod's node on any machine: `env $(pod_env) k8s/entrypoint.sh overrides...`.
set -eu
nnodes="${GAN_NNODES:?set GAN_NNODES to the number of nodes}"
nproc="${GAN_NPROC_PER_NODE:?set GAN_NPROC_PER_NODE to the worker processes per node}"
rank="${GAN_NODE_RANK:-${JOB_COMPLETION_INDEX:-${PET_NODE_RANK:-${RANK:?no node rank: set GAN_NODE_RANK}}}}"
addr="${GAN_MASTER_ADDR:-${MASTER_ADDR:-${PET_MASTER_ADDR:?no master address: set GAN_MASTER_ADDR}}}"
port="${GAN_MASTER_PORT:-${MASTER_PORT:-${PET_MASTER_PORT:-29500}}}"
# exec: torchrun replaces the shell as the container's main process, so the kubelet's SIGTERM reaches it and it
# passes it on to the workers (they write last.ckpt and exit 143; see train.preempt_grace_s).
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$rank" \
    --nproc-per-node "$nproc" --master-addr "$addr" --master-port "$port" \
    --max-restarts "${GAN_MAX_RESTARTS:-0}" -m pipeline.train "$@"
