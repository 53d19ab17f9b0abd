#!/usr/bin/env bash
# Puts the ttrl_jax code on every worker of a TPU and installs it with the TPU extra.
set -euo pipefail
HERE=.
[[ ${BASH_SOURCE[0]} == */* ]] && HERE=${BASH_SOURCE[0]%/*}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  print_stdin <<EOF
Usage: $0 --name NAME --zone ZONE (--repo URL [--ref REF] | --copy PATH) [options]

On every worker of the TPU: fetch the code (git clone/fetch, or a copy of a local
checkout) into DIR, then run: PYTHON -m pip install -e "DIR[tpu]".

Required:
  --name NAME        TPU name.
  --zone ZONE        TPU zone.
  --repo URL         Git URL to clone on each worker (use with --ref), or
  --copy PATH        local checkout to copy to each worker (uncommitted edits included;
                     .git, caches and virtualenvs are left out).

Options:
  --ref REF          Branch, tag or full commit to check out with --repo (default: main).
  --dir DIR          Code directory on the workers, relative to the home directory
                     (default: ttrl_jax). Re-running setup updates it in place.
  --python PYTHON    Python on the workers (default: python3).
  --project PROJECT  Google Cloud project (default: gcloud's configured project).
  --dry-run          Print the commands instead of running them.
  -h, --help         Show this help.

Example:
  $0 --name ttrl-v4 --zone us-central2-b --repo https://github.com/ORG/ttrl_jax --ref main
  $0 --name ttrl-v4 --zone us-central2-b --copy .
EOF
}

name="" zone="" repo="" ref="main" copy="" dir="ttrl_jax" python="python3"
normalize_args "$@"
set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
while (($#)); do
  case $1 in
    --name) name=$(take_value "$@"); shift ;;
    --zone) zone=$(take_value "$@"); shift ;;
    --repo) repo=$(take_value "$@"); shift ;;
    --ref) ref=$(take_value "$@"); shift ;;
    --copy) copy=$(take_value "$@"); shift ;;
    --dir) dir=$(take_value "$@"); shift ;;
    --python) python=$(take_value "$@"); shift ;;
    --project) PROJECT=$(take_value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

require_arg --name "$name"
require_arg --zone "$zone"
check_tpu_name "$name"
[[ -n $repo || -n $copy ]] || usage_error "missing required argument --repo URL or --copy PATH"
[[ -n $repo && -n $copy ]] && usage_error "give either --repo or --copy, not both"
if [[ -n $copy ]]; then
  [[ -f $copy/pyproject.toml ]] ||
    usage_error "--copy $copy is not a ttrl_jax checkout (no pyproject.toml in it)"
fi
dir=$(remote_path "$dir")
[[ -n $dir && $dir != . ]] || usage_error "--dir must name a directory below the home directory"
require_gcloud
scope_flags "$zone"

qdir=$(shell_quote "$dir")
install="cd $qdir && $(shell_quote "$python") -m pip install --upgrade pip"
install+=" && $(shell_quote "$python") -m pip install -e \".[tpu]\""

if [[ -n $copy ]]; then
  # One tarball through scp is far faster than a recursive scp of many small files.
  tarball="${TMPDIR:-/tmp}/ttrl_jax-src-$name.tar.gz"
  remote_tarball="ttrl_jax-src.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.venv --exclude=venv --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=tpu_logs -C "$copy" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tarball" --worker=all \
    "${SCOPE_FLAGS[@]}"
  unpack="mkdir -p $qdir && tar -xzf $remote_tarball -C $qdir && rm -f $remote_tarball"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${SCOPE_FLAGS[@]}" \
    --command="set -e; $unpack && $install"
  run rm -f "$tarball"
else
  qref=$(shell_quote "$ref")
  # Fetch then check out detached, so that a branch, a tag or a commit all update an
  # existing clone to the remote's current state.
  fetch="if [ ! -d $qdir/.git ]; then git clone $(shell_quote "$repo") $qdir; fi"
  fetch+=" && git -C $qdir remote set-url origin $(shell_quote "$repo")"
  fetch+=" && git -C $qdir fetch --tags --force origin"
  fetch+=" && { git -C $qdir checkout --detach origin/$qref 2>/dev/null"
  fetch+=" || git -C $qdir checkout --detach $qref; }"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${SCOPE_FLAGS[@]}" \
    --command="set -e; $fetch && $install"
fi
note "next: start a run with launch.sh --name $name --zone $zone --mesh DxM"
