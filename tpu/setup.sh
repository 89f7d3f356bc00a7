#!/usr/bin/env bash
# Install jaxlm (this checkout) and JAX for TPU on every worker of a slice.
#
#   tpu/setup.sh --name my-pod --zone us-central2-b [--bucket my-bucket] [--dry-run]
#
# Copies this checkout (git archive of HEAD) to ~/jaxlm on all workers and pip-installs it with
# jax[tpu]. --bucket mounts gs://BUCKET at /mnt/jaxlm on every worker (gcsfuse): a multi-host run
# needs its train.workdir on storage every worker sees, since each writes its checkpoint shards.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
where
repo="$(cd "$(dirname "$0")/.." && pwd)"
jax_version=$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' "$repo/pyproject.toml" | head -n 1)

run git -C "$repo" archive --format=tar.gz --prefix=jaxlm/ -o /tmp/jaxlm-src.tar.gz HEAD
run gcloud compute tpus tpu-vm scp /tmp/jaxlm-src.tar.gz "$NAME:/tmp/jaxlm-src.tar.gz" "${WHERE[@]}" --worker=all
on_workers "rm -rf ~/jaxlm && tar -xzf /tmp/jaxlm-src.tar.gz -C ~ && python3 -m pip install -q -U pip && python3 -m pip install -q 'jax[tpu]==${jax_version}' -e ~/jaxlm && python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
if [ -n "$BUCKET" ]; then
  on_workers "(command -v gcsfuse || (curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) && sudo mkdir -p /mnt/jaxlm && sudo chown \$USER /mnt/jaxlm && (mountpoint -q /mnt/jaxlm || gcsfuse --implicit-dirs $BUCKET /mnt/jaxlm)"
fi
echo "next: tpu/launch.sh --name $NAME --zone $ZONE -- --config configs/gpt2_small.yaml ..."
