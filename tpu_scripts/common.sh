# shellcheck shell=bash
# Shared helpers for the TPU scripts; sourced, never run.
#
# Every script follows the same shape: parse options with `take_value`, check them with
# `require_arg`, call `require_gcloud`, then issue each command through `run`, which prints
# instead of executing under --dry-run. No external program is called before `require_gcloud`,
# so a missing gcloud is reported even on a PATH that holds nothing but bash.

DRY_RUN=0
PROJECT=""
SCRIPT_NAME=${0##*/}

# Prints an error naming the problem and exits non-zero.
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# Prints an error plus a pointer to --help; used for bad command lines.
usage_error() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$0" >&2
  exit 2
}

# Prints a progress note on stderr, so that stdout carries only the commands in dry-run mode.
note() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# Copies stdin to stdout with builtins only (help text works on any PATH).
print_stdin() {
  local text
  IFS= read -r -d '' text || true
  printf '%s' "$text"
}

# Quotes one word for a POSIX shell, leaving plain words bare (like Python's shlex.quote).
shell_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: a line that can be pasted into a shell.
# In --flag=value words only the value is quoted, which reads better and means the same.
join_quoted() {
  local out="" word quoted
  for word in "$@"; do
    if [[ $word =~ ^--[A-Za-z0-9-]+= ]]; then
      quoted="${word%%=*}=$(shell_quote "${word#*=}")"
    else
      quoted=$(shell_quote "$word")
    fi
    out+="${out:+ }$quoted"
  done
  printf '%s' "$out"
}

# Runs a command, or under --dry-run prints it (one line, shell-quoted) on stdout.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# Fails unless gcloud is on PATH; skipped under --dry-run, which never calls it.
require_gcloud() {
  ((DRY_RUN)) && return 0
  command -v gcloud >/dev/null 2>&1 && return 0
  die "gcloud not found on PATH. Install the Google Cloud SDK" \
    "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login' and" \
    "'gcloud config set project PROJECT_ID'. Use --dry-run to print the commands without gcloud."
}

# Fails, naming the option, when a required option was not given.
require_arg() {
  local option=$1 value=$2
  [[ -n $value ]] || usage_error "missing required argument $option"
}

# Checks that an option has a value and prints it; call as: name=$(take_value "$@").
take_value() {
  local option=$1
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    usage_error "option $option needs a value"
  fi
  printf '%s' "$2"
}

# Splits --opt=value into --opt value (up to a bare --) so scripts parse one form only.
# The result is left in the global array NORMALIZED_ARGS.
normalize_args() {
  NORMALIZED_ARGS=()
  while (($#)); do
    case $1 in
      --) NORMALIZED_ARGS+=("$@"); return 0 ;;
      --*=*) NORMALIZED_ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) NORMALIZED_ARGS+=("$1") ;;
    esac
    shift
  done
}

# The zone and project flags shared by every gcloud call, in the array SCOPE_FLAGS.
scope_flags() {
  local zone=$1
  SCOPE_FLAGS=("--zone=$zone")
  [[ -n $PROJECT ]] && SCOPE_FLAGS+=("--project=$PROJECT")
  return 0
}

# Validates a TPU name the way Cloud TPU does (lowercase letters, digits, hyphens).
check_tpu_name() {
  [[ $1 =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name '$1' is not a valid TPU name: use lowercase letters, digits and" \
      "hyphens, starting with a letter"
}

# Validates a name used as a directory on the workers (run names).
check_plain_name() {
  local option=$1 value=$2
  [[ $value =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    usage_error "$option '$value' must be letters, digits, '.', '_' or '-'"
}

# Turns a path on the workers into one relative to the login directory, where ssh and scp
# start; a leading ~/ is dropped because it would not be expanded inside quotes.
remote_path() {
  local path=${1#\~/}
  [[ $path == "~" ]] && path=.
  printf '%s' "$path"
}

# Prints the runtime image documented for the generation in an accelerator type.
default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

# Prints the number of JAX devices in an accelerator type, which is what --mesh must multiply
# to. The suffix counts TensorCores for v2-v5p and chips for v5e and v6e; v4 and v5p chips
# join their two cores into one device (megacore), v2 and v3 cores are devices of their own.
device_count() {
  local type=$1 n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $type in
    v4-* | v5p-*) printf '%d' $((n / 2)) ;;
    v2-* | v3-* | v5litepod-* | v6e-*) printf '%d' "$n" ;;
    *) return 1 ;;
  esac
}
