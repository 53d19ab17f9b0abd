#!/usr/bin/env bash
# Starts `python -m ttrl_jax.run` on every worker of a TPU at once, in the background.
set -euo pipefail
HERE=.
[[ ${BASH_SOURCE[0]} == */* ]] && HERE=${BASH_SOURCE[0]%/*}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

usage() {
  print_stdin <<EOF
Usage: $0 --name NAME --zone ZONE --mesh DxM [options] [-- RUN_ARGS...]

Start "PYTHON -m ttrl_jax.run --mesh DxM [--config FILE] RUN_ARGS..." on all workers
(--worker=all) under nohup, so it survives the ssh session. Each worker writes its output to
~/ttrl_runs/RUN_NAME/worker-ID.log and its process id to worker-ID.pid, where ID is the
worker index (TPU_WORKER_ID, else the TPU metadata agent-worker-number, else the hostname's
-w-N suffix). ~/ttrl_runs/latest points at the newest run.

Required:
  --name NAME        TPU name.
  --zone ZONE        TPU zone.
  --mesh DxM         Device mesh (data x model); D*M must equal the number of chips
                     (JAX devices) across all workers, e.g. v4-8: 1x4, v4-16: 2x4 or 1x8.
                     auto puts every device on the data axis.

Options:
  --config FILE      Config YAML, relative to the code directory (e.g. configs/x.yaml).
  --run-name RUN     Run directory name (default: run-YYYYmmdd-HHMMSS).
  --env KEY=VALUE    Environment variable for the run; repeatable (e.g. --env HF_HOME=/data/hf).
  --dir DIR          Code directory on the workers, as given to setup.sh (default: ttrl_jax).
  --python PYTHON    Python on the workers (default: python3).
  --project PROJECT  Google Cloud project (default: gcloud's configured project).
  --dry-run          Print the gcloud command instead of running it.
  -h, --help         Show this help.
  -- RUN_ARGS        Everything after -- is passed to ttrl_jax.run as is (key=value overrides).

Example:
  $0 --name ttrl-v4 --zone us-central2-b --mesh 4x1 \\
      --config configs/qwen2.5-math-1.5b_math500.yaml --run-name math500-1 -- run.max_steps=20
EOF
}

name="" zone="" mesh="" config="" run_name="" dir="ttrl_jax" python="python3"
envs=() run_args=()
normalize_args "$@"
set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
while (($#)); do
  case $1 in
    --name) name=$(take_value "$@"); shift ;;
    --zone) zone=$(take_value "$@"); shift ;;
    --mesh) mesh=$(take_value "$@"); shift ;;
    --config) config=$(take_value "$@"); shift ;;
    --run-name) run_name=$(take_value "$@"); shift ;;
    --env) envs+=("$(take_value "$@")"); shift ;;
    --dir) dir=$(take_value "$@"); shift ;;
    --python) python=$(take_value "$@"); shift ;;
    --project) PROJECT=$(take_value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; run_args=("$@"); break ;;
    *) usage_error "unknown argument '$1' (arguments for ttrl_jax.run go after --)" ;;
  esac
  shift
done

require_arg --name "$name"
require_arg --zone "$zone"
check_tpu_name "$name"
require_arg --mesh "$mesh"
[[ $mesh == auto || $mesh =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] ||
  usage_error "--mesh '$mesh' must look like DxM with positive integers, e.g. 2x4, or be auto"
if [[ -z $run_name ]]; then
  printf -v run_name 'run-%(%Y%m%d-%H%M%S)T' -1
fi
check_plain_name --run-name "$run_name"
[[ $run_name != latest ]] || usage_error "--run-name latest is reserved for the newest run"
for kv in ${envs[@]+"${envs[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$kv' must look like KEY=VALUE"
done
dir=$(remote_path "$dir")
require_gcloud
scope_flags "$zone"

# The python command line, quoted for the worker's shell. PYTHONUNBUFFERED makes the log
# follow the run line by line instead of in 4 KB blocks.
train=(env PYTHONUNBUFFERED=1 ${envs[@]+"${envs[@]}"} "$python" -m ttrl_jax.run --mesh "$mesh")
[[ -n $config ]] && train+=(--config "$config")
train+=(${run_args[@]+"${run_args[@]}"})

# What each worker runs, one statement a line (joined with "; " below). The worker index is
# TPU_WORKER_ID if the image sets it, else the metadata server's agent-worker-number (what JAX
# itself reads), else the -w-N suffix of TPU VM hostnames. All three standard streams of the
# run are redirected so that ssh returns at once.
read -r -d '' template <<'EOF' || true
set -e
cd @DIR@ 2>/dev/null || { echo "$(hostname): no code in ~/@DIR@; run setup.sh first" >&2; exit 1; }
run_dir="$HOME/ttrl_runs/@RUN@"
mkdir -p "$run_dir"
ln -sfn @RUN@ "$HOME/ttrl_runs/latest"
worker=${TPU_WORKER_ID:-}
[ -n "$worker" ] || worker=$(curl -sf -m 5 -H Metadata-Flavor:Google @METADATA_URL@ || true)
if [ -z "$worker" ]; then h=$(hostname); case $h in *-w-[0-9]*) worker=${h##*-w-} ;; esac; fi
worker=${worker:-0}
log="$run_dir/worker-$worker.log"
pid_file="$run_dir/worker-$worker.pid"
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then echo "worker $worker: run @RUN@ is still running (pid $(cat "$pid_file")); stop it or pick another --run-name" >&2; exit 1; fi
nohup @CMD@ >"$log" 2>&1 </dev/null & echo $! >"$pid_file"
echo "worker $worker: started pid $(cat "$pid_file"), log $log"
EOF
metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
remote=${template//$'\n'/; }
# Quoted replacements: an unquoted "&" in one would stand for the matched text (bash 5.2).
remote=${remote//@DIR@/"$(shell_quote "$dir")"}
remote=${remote//@RUN@/"$run_name"}
remote=${remote//@METADATA_URL@/"$metadata_url"}
remote=${remote//@CMD@/"$(join_quoted "${train[@]}")"}

run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${SCOPE_FLAGS[@]}" --command="$remote"
((DRY_RUN)) || note "run '$run_name' started; follow it with:" \
  "logs.sh --name $name --zone $zone --run-name $run_name --follow"
