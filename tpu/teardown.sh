#!/usr/bin/env bash
# Delete the TPU VM / slice (and its queued resource). Checkpoints in the bucket stay.
#
#   tpu/teardown.sh --name my-pod --zone us-central2-b [--queued] [--dry-run]
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
where
if [ "$QUEUED" = 1 ]; then
  run gcloud compute tpus queued-resources delete "$NAME-qr" "${WHERE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
fi
