#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice, directly or through a queued resource.
set -euo pipefail
HERE=.
[[ ${BASH_SOURCE[0]} == */* ]] && HERE=${BASH_SOURCE[0]%/*}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  print_stdin <<EOF
Usage: $0 --name NAME --zone ZONE --type TYPE [options] [-- GCLOUD_FLAGS...]

Create a Cloud TPU VM (one host) or pod slice (several hosts, called workers).

Required:
  --name NAME        TPU name (lowercase letters, digits, hyphens).
  --zone ZONE        Zone that offers TYPE, e.g. us-central2-b (v4), us-west4-a (v5e).
  --type TYPE        Accelerator type: v4-8, v4-16, v5litepod-16, v5p-8, v6e-8, ...

Options:
  --version VERSION  TPU runtime image. Default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                     v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
  --spot             Request Spot capacity (cheaper, can be preempted at any time).
  --queued           Request the TPU through a queued resource (named NAME, with node NAME):
                     it waits for capacity instead of failing when none is free.
  --project PROJECT  Google Cloud project (default: gcloud's configured project).
  --dry-run          Print the gcloud commands instead of running them.
  -h, --help         Show this help.
  -- GCLOUD_FLAGS    Further flags for the create command, e.g. -- --network=my-net.

Example:
  $0 --name ttrl-v4 --zone us-central2-b --type v4-8 --spot
  $0 --name ttrl-v5e --zone us-west4-a --type v5litepod-16 --queued --dry-run
EOF
}

name="" zone="" type="" version="" spot=0 queued=0
extra=()
normalize_args "$@"
set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
while (($#)); do
  case $1 in
    --name) name=$(take_value "$@"); shift ;;
    --zone) zone=$(take_value "$@"); shift ;;
    --type) type=$(take_value "$@"); shift ;;
    --version) version=$(take_value "$@"); shift ;;
    --project) PROJECT=$(take_value "$@"); shift ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

require_arg --name "$name"
require_arg --zone "$zone"
require_arg --type "$type"
check_tpu_name "$name"
[[ $type == v5e-* ]] && usage_error "--type $type: v5e types are named v5litepod-N, e.g. v5litepod-${type##*-}"
[[ $type =~ ^v[0-9][a-z]*-[0-9]+$ ]] ||
  usage_error "--type '$type' is not an accelerator type such as v4-8, v5litepod-16, v5p-8, v6e-8"
if [[ -z $version ]]; then
  version=$(default_runtime_version "$type") ||
    usage_error "no default runtime image for --type $type; pass --version"
fi
require_gcloud
scope_flags "$zone"

if ((queued)); then
  cmd=(gcloud compute tpus queued-resources create "$name" --node-id="$name" "${SCOPE_FLAGS[@]}"
    --accelerator-type="$type" --runtime-version="$version")
else
  cmd=(gcloud compute tpus tpu-vm create "$name" "${SCOPE_FLAGS[@]}"
    --accelerator-type="$type" --version="$version")
fi
((spot)) && cmd+=(--spot)
run "${cmd[@]}" ${extra[@]+"${extra[@]}"}

if devices=$(device_count "$type"); then
  note "$type has $devices JAX devices: launch with --mesh DxM where D*M = $devices" \
    "(e.g. --mesh 1x$devices or ${devices}x1)."
fi
if ((queued)); then
  note "queued: check progress with: gcloud compute tpus queued-resources describe $name" \
    "--zone=$zone (setup.sh works once its state is ACTIVE)."
fi
