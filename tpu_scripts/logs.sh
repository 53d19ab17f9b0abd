#!/usr/bin/env bash
# Streams or fetches the per-worker logs that launch.sh writes on a TPU.
set -euo pipefail
HERE=.
[[ ${BASH_SOURCE[0]} == */* ]] && HERE=${BASH_SOURCE[0]%/*}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  print_stdin <<EOF
Usage: $0 --name NAME --zone ZONE [--run-name RUN] [--follow | --out DIR] [options]

Without --follow: copy ~/ttrl_runs/RUN/worker-ID.log from each worker into a local directory.
With --follow: stream the logs live (tail -F), each line prefixed with [worker ID]; Ctrl-C
stops streaming, not the run.

Required:
  --name NAME        TPU name.
  --zone ZONE        TPU zone.

Options:
  --run-name RUN     Run to read, as given to launch.sh (default: latest, the newest run).
  --worker W         Worker index, or all (default: all).
  --follow           Stream instead of copying.
  --lines N          With --follow, lines of history to show first (default: 100).
  --out DIR          Local directory for copied logs (default: tpu_logs/NAME/RUN).
  --workers N        Number of workers, to skip asking gcloud for it (used with --worker all
                     when copying, since scp copies from one worker at a time).
  --project PROJECT  Google Cloud project (default: gcloud's configured project).
  --dry-run          Print the commands instead of running them.
  -h, --help         Show this help.

Example:
  $0 --name ttrl-v4 --zone us-central2-b --run-name aime-1 --follow
  $0 --name ttrl-v5e --zone us-west4-a --out ./logs
EOF
}

name="" zone="" run_name="latest" worker="all" follow=0 lines=100 out="" workers=""
normalize_args "$@"
set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
while (($#)); do
  case $1 in
    --name) name=$(take_value "$@"); shift ;;
    --zone) zone=$(take_value "$@"); shift ;;
    --run-name) run_name=$(take_value "$@"); shift ;;
    --worker) worker=$(take_value "$@"); shift ;;
    --follow) follow=1 ;;
    --lines) lines=$(take_value "$@"); shift ;;
    --out) out=$(take_value "$@"); shift ;;
    --workers) workers=$(take_value "$@"); shift ;;
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
check_plain_name --run-name "$run_name"
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or all"
[[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines must be a number"
[[ -z $workers || $workers =~ ^[1-9][0-9]*$ ]] || usage_error "--workers must be a positive number"
((follow)) && [[ -n $out ]] && usage_error "--out copies logs; it does not go with --follow"
out=${out:-tpu_logs/$name/$run_name}
require_gcloud
scope_flags "$zone"

if ((follow)); then
  # Runs on each worker: find its own log (the file name carries the worker index) and tail
  # it with a prefix, since gcloud interleaves the output of all workers.
  read -r -d '' template <<'EOF' || true
cd "$HOME/ttrl_runs/@RUN@" 2>/dev/null || { echo "$(hostname): no run @RUN@ in ~/ttrl_runs" >&2; exit 1; }
set -- worker-*.log
[ -e "$1" ] || { echo "$(hostname): no worker log in ~/ttrl_runs/@RUN@" >&2; exit 1; }
w=${1#worker-}
w=${w%.log}
tail -n @LINES@ -F "$1" | sed -u "s/^/[worker $w] /"
EOF
  remote=${template//$'\n'/; }
  remote=${remote//@RUN@/"$run_name"}
  remote=${remote//@LINES@/"$lines"}
  run gcloud compute tpus tpu-vm ssh "$name" --worker="$worker" "${SCOPE_FLAGS[@]}" \
    --command="$remote"
  exit 0
fi

# scp copies from one worker at a time, so --worker all becomes one copy per worker.
if [[ $worker == all ]]; then
  if [[ -z $workers ]] && ((DRY_RUN)); then
    note "dry run: showing worker 0 only; pass --workers N to list every copy"
    workers=1
  fi
  if [[ -z $workers ]]; then
    mapfile -t endpoints < <(gcloud compute tpus tpu-vm describe "$name" "${SCOPE_FLAGS[@]}" \
      --flatten=networkEndpoints --format='value(networkEndpoints.ipAddress)')
    workers=${#endpoints[@]}
    ((workers > 0)) || die "gcloud reported no workers for TPU $name in $zone; is it READY?"
  fi
  worker_ids=()
  for ((i = 0; i < workers; i++)); do worker_ids+=("$i"); done
else
  worker_ids=("$worker")
fi

run mkdir -p "$out"
for id in "${worker_ids[@]}"; do
  run gcloud compute tpus tpu-vm scp "$name:ttrl_runs/$run_name/worker-*.log" "$out/" \
    --worker="$id" "${SCOPE_FLAGS[@]}"
done
((DRY_RUN)) || note "logs copied to $out"
