#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: the same command on every host, one JAX process per host.
#
#   launch/tpu_pod.sh create                       # create the TPU VM slice
#   launch/tpu_pod.sh setup                        # copy this repository to every host and install it
#   launch/tpu_pod.sh run [--config.key=value ...] # train; extra flags go to tt_jax.main
#   launch/tpu_pod.sh delete                       # delete the slice
#
# See launch/README.md for the environment variables.
set -euo pipefail

TPU_NAME="${TPU_NAME:-tt-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"  # empty: gcloud's default project
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-}"  # empty: gs://$BUCKET/tt_jax/<config name>
BUCKET="${BUCKET:-}"
PYTHON="${PYTHON:-python3.11}"  # the project needs Python >= 3.11
REMOTE_DIR="${REMOTE_DIR:-tt_jax}"  # on every host, relative to the home directory

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  TPU_FLAGS+=(--project="$PROJECT")
fi

usage() {
  cat <<USAGE
usage: $(basename "$0") create | setup | run [tt_jax.main flags ...] | delete

  create  gcloud compute tpus tpu-vm create \$TPU_NAME (\$ACCELERATOR_TYPE, \$RUNTIME_VERSION, \$ZONE)
  setup   copy the repository to every host and pip install it (with jax[tpu] and the tfds extra) into a venv
  run     python -m tt_jax.main --config \$CONFIG --workdir \$WORKDIR on every host
  delete  delete the TPU VM

environment (current value):
  TPU_NAME=$TPU_NAME ZONE=$ZONE ACCELERATOR_TYPE=$ACCELERATOR_TYPE
  RUNTIME_VERSION=$RUNTIME_VERSION PROJECT=${PROJECT:-<gcloud default>}
  CONFIG=$CONFIG WORKDIR=${WORKDIR:-<gs://\$BUCKET/tt_jax/config name>} BUCKET=${BUCKET:-<unset>}
  PYTHON=$PYTHON REMOTE_DIR=~/$REMOTE_DIR
USAGE
}

# Runs a shell command on every host of the slice at once.
on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all --command="$1"
}

create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

setup() {
  local archive
  archive="$(mktemp --suffix=.tar.gz)"
  # shellcheck disable=SC2064  # the path is fixed now, removed whenever the script exits
  trap "rm -f '$archive'" EXIT
  tar -czf "$archive" -C "$REPO_ROOT" \
    --exclude=./.git --exclude=./.venv --exclude=./runs --exclude='__pycache__' --exclude='*.egg-info' .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/tt_jax.tar.gz" "${TPU_FLAGS[@]}" --worker=all
  local python
  python="$(printf %q "$PYTHON")"
  on_all_hosts "set -euo pipefail
    if ! command -v $python >/dev/null; then
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $python $python-venv
    fi
    mkdir -p ~/$REMOTE_DIR && tar -xzf ~/tt_jax.tar.gz -C ~/$REMOTE_DIR && rm ~/tt_jax.tar.gz
    cd ~/$REMOTE_DIR
    [[ -x .venv/bin/python ]] || $python -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[tfds,gcs]' 'jax[tpu]'"  # tfds: read prepared datasets; gcs: gs:// workdirs
}

run() {
  local workdir="$WORKDIR"
  if [[ -z "$workdir" ]]; then
    if [[ -z "$BUCKET" ]]; then
      echo "error: set WORKDIR (a bucket URL or a directory every host sees) or BUCKET (for gs://\$BUCKET/tt_jax/...)" >&2
      exit 2
    fi
    workdir="gs://$BUCKET/tt_jax/$(basename "$CONFIG" .py)"
  fi
  local command="cd ~/$REMOTE_DIR && export TT_JAX_DISTRIBUTED=1 && exec .venv/bin/python -m tt_jax.main"
  command+=" --config $(printf %q "$CONFIG") --workdir $(printf %q "$workdir")"
  local arg
  for arg in "$@"; do
    command+=" $(printf %q "$arg")"
  done
  on_all_hosts "$command"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
}

main() {
  if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
  fi
  local subcommand="$1"
  shift
  case "$subcommand" in
    create | setup | delete)
      if [[ $# -gt 0 ]]; then
        echo "error: $subcommand takes no arguments" >&2
        exit 2
      fi
      "$subcommand"
      ;;
    run) run "$@" ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
