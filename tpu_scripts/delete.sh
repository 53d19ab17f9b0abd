#!/usr/bin/env bash
# Deletes a TPU VM, or a queued resource together with its TPU.
set -euo pipefail
HERE=.
[[ ${BASH_SOURCE[0]} == */* ]] && HERE=${BASH_SOURCE[0]%/*}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  print_stdin <<EOF
Usage: $0 --name NAME --zone ZONE [--queued] [--yes] [options]

Delete the TPU NAME. Billing stops only once it is gone; copy logs and checkpoints first.

Required:
  --name NAME        TPU name (for --queued: the queued resource, named like its TPU by
                     create.sh --queued).
  --zone ZONE        TPU zone.

Options:
  --queued           Delete the queued resource NAME and, with --force, the TPU it holds.
  --yes              Do not ask for confirmation (passes --quiet to gcloud).
  --project PROJECT  Google Cloud project (default: gcloud's configured project).
  --dry-run          Print the gcloud command instead of running it.
  -h, --help         Show this help.

Example:
  $0 --name ttrl-v4 --zone us-central2-b
  $0 --name ttrl-v5e --zone us-west4-a --queued --yes
EOF
}

name="" zone="" queued=0 yes=0
normalize_args "$@"
set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
while (($#)); do
  case $1 in
    --name) name=$(take_value "$@"); shift ;;
    --zone) zone=$(take_value "$@"); shift ;;
    --project) PROJECT=$(take_value "$@"); shift ;;
    --queued) queued=1 ;;
    --yes) yes=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

require_arg --name "$name"
require_arg --zone "$zone"
check_tpu_name "$name"
require_gcloud
scope_flags "$zone"

if ((queued)); then
  # --force deletes the TPU held by the queued resource first; without it an ACTIVE
  # queued resource cannot be deleted.
  cmd=(gcloud compute tpus queued-resources delete "$name" "${SCOPE_FLAGS[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$name" "${SCOPE_FLAGS[@]}")
fi
((yes)) && cmd+=(--quiet)
run "${cmd[@]}"
