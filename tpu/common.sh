# shellcheck shell=bash disable=SC2034  # the variables are read by the scripts that source this
# Shared by the tpu/*.sh scripts (sourced, not run): options, defaults and the dry-run runner.
#
#   --name NAME              TPU VM / node name            (default: $JAXLM_TPU_NAME or jaxlm-tpu)
#   --zone ZONE              e.g. us-central2-b            (default: $JAXLM_TPU_ZONE or us-central2-b)
#   --project PROJECT        gcloud project                (default: gcloud's configured project)
#   --accelerator-type TYPE  v4-8 (one host), v4-32 (4 hosts), v5litepod-16, v6e-64, ...
#   --version VERSION        TPU software version          (default: tpu-ubuntu2204-base)
#   --queued                 go through queued resources (large slices, spot capacity)
#   --spot                   spot (preemptible) capacity
#   --bucket BUCKET          GCS bucket mounted on every worker at /mnt/jaxlm (shared run dirs)
#   --dry-run                print the commands instead of running them
#   --                       the rest goes to the script (e.g. `jaxlm train` settings for launch.sh)

NAME="${JAXLM_TPU_NAME:-jaxlm-tpu}"
ZONE="${JAXLM_TPU_ZONE:-us-central2-b}"
PROJECT="${JAXLM_TPU_PROJECT:-}"
TYPE="${JAXLM_TPU_TYPE:-v4-8}"
VERSION="${JAXLM_TPU_VERSION:-tpu-ubuntu2204-base}"
QUEUED=0
SPOT=0
BUCKET="${JAXLM_TPU_BUCKET:-}"
DRY_RUN=0
REST=()

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator-type) TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
      --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --spot) SPOT=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      --) shift; REST=("$@"); break ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  case "$NAME" in
    *[!a-z0-9-]*|-*|"") die "--name $NAME: use lowercase letters, digits and dashes" ;;
  esac
  if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry-run shows the commands"
  fi
}

# gcloud flags every command shares.
where() {
  WHERE=(--zone="$ZONE")
  if [ -n "$PROJECT" ]; then WHERE+=(--project="$PROJECT"); fi
}

# One argument as the shell would need it typed: bare when safe, else in single quotes.
quote() {
  case "$1" in
    *[!A-Za-z0-9_./=:,@%+-]*|"") printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Print the command (copy-pasteable); run it unless --dry-run.
run() {
  local line="+" arg
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  echo "$line"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# A command on every worker of the slice at once (or one: WORKER=0).
on_workers() {
  where
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="${WORKER:-all}" --command="$1"
}
