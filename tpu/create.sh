#!/usr/bin/env bash
# Create a TPU VM or pod slice for jaxlm.
#
#   tpu/create.sh --name my-pod --zone us-central2-b --accelerator-type v4-32 [--queued] [--spot] [--dry-run]
#
# A single host (v4-8, v5litepod-8, ...) or a pod slice of several hosts (v4-32 = 4 hosts);
# --queued goes through queued resources (the way to get large slices and spot capacity) and
# waits until the slice is ACTIVE. See tpu/common.sh for every option.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
where
extra=()
if [ "$SPOT" = 1 ]; then extra+=(--spot); fi

if [ "$QUEUED" = 1 ]; then
  run gcloud compute tpus queued-resources create "$NAME-qr" "${WHERE[@]}" --node-id="$NAME" \
    --accelerator-type="$TYPE" --runtime-version="$VERSION" "${extra[@]}"
  echo "waiting for $NAME-qr to become ACTIVE (Ctrl-C stops waiting, not the request)"
  describe=(gcloud compute tpus queued-resources describe "$NAME-qr" "${WHERE[@]}" --format='value(state.state)')
  DRY_RUN=1 run "${describe[@]}"
  while [ "$DRY_RUN" = 0 ]; do
    state=$("${describe[@]}")
    echo "$(date +%H:%M:%S) $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $NAME-qr is $state" ;;
    esac
    sleep 30
  done
else
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
    --version="$VERSION" "${extra[@]}"
fi
echo "next: tpu/setup.sh --name $NAME --zone $ZONE"
