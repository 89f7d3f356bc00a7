#!/usr/bin/env bash
# Start `jaxlm train` on every worker at once (one process per host, joined by jax.distributed).
#
#   tpu/launch.sh --name my-pod --zone us-central2-b [--bucket my-bucket] [--dry-run] -- [jaxlm train args]
#
# Every worker runs the same command in the background (it survives the ssh session) and writes
# ~/jaxlm-train.log; only process 0 prints progress. `--distributed` makes JAX find the other
# hosts of the slice. With --bucket the run dir defaults to /mnt/jaxlm/runs/NAME (see setup.sh).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
args=("${REST[@]}")
if [ -n "$BUCKET" ] && ! printf '%s\n' "${args[@]}" | grep -q '^train.workdir='; then
  args+=("train.workdir=/mnt/jaxlm/runs/$NAME")
fi
train_args=$(printf '%q ' "${args[@]}")
on_workers "cd ~/jaxlm && nohup python3 -m jaxlm.cli train --distributed ${train_args% } > ~/jaxlm-train.log 2>&1 < /dev/null &"
echo "next: tpu/logs.sh --name $NAME --zone $ZONE"
