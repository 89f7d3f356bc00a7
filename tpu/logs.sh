#!/usr/bin/env bash
# Stream the training log of worker 0 (the process that reports), from its beginning.
#
#   tpu/logs.sh --name my-pod --zone us-central2-b [--dry-run]
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
WORKER=0 on_workers "tail -n +1 -F ~/jaxlm-train.log"
