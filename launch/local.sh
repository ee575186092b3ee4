#!/usr/bin/env bash
# Runs a command as N JAX processes on this machine, each with K CPU devices:
# the multi-controller code path of a pod, on one host.
#
#   launch/local.sh N [--devices K] [--log-dir DIR] [--dry-run] -- CMD...
#
# Process i gets ISR_DPO_COORDINATOR=127.0.0.1:<free port>,
# ISR_DPO_NUM_PROCESSES=N, ISR_DPO_PROCESS_ID=i and
# XLA_FLAGS=--xla_force_host_platform_device_count=K (default K=1), and writes
# its output to DIR/process_i.log. If one process fails, the others are killed
# and the script exits with the status of the first failure; 0 if all succeed.
set -euo pipefail

usage() {
  echo "usage: $0 N [--devices K] [--log-dir DIR] [--dry-run] -- CMD..." >&2
  exit 2
}

if (($# == 0)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  usage
fi
num_processes=$1
shift
devices=1
log_dir=
dry_run=false
while (($#)); do
  case $1 in
    --devices) devices=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
(($#)) || usage

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# The device count of an outer XLA_FLAGS (e.g. the test Makefile's) is replaced.
device_count_flag=--xla_force_host_platform_device_count
xla_flags=$(sed -E "s/${device_count_flag}=[0-9]+//g" <<<"${XLA_FLAGS:-}")
xla_flags="${xla_flags} ${device_count_flag}=${devices}"
env_common=(
  "ISR_DPO_COORDINATOR=127.0.0.1:$(free_port)"
  "ISR_DPO_NUM_PROCESSES=${num_processes}"
  "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}"
  "XLA_FLAGS=${xla_flags# }"
)

if $dry_run; then
  for ((i = 0; i < num_processes; i++)); do
    printf '%q ' env "${env_common[@]}" "ISR_DPO_PROCESS_ID=$i" "$@"
    echo
  done
  exit 0
fi

log_dir=${log_dir:-$(mktemp -d "${TMPDIR:-/tmp}/isr_dpo_local.XXXXXX")}
mkdir -p "$log_dir"
echo "local.sh: ${num_processes} processes x ${devices} devices," \
  "logs in ${log_dir}" >&2

# Each process leads its own process group: killing it kills its children.
set -m
pids=()
kill_all() {
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
trap 'kill_all; exit 143' INT TERM
for ((i = 0; i < num_processes; i++)); do
  env "${env_common[@]}" "ISR_DPO_PROCESS_ID=$i" "$@" \
    >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
for ((left = num_processes; left > 0; left--)); do
  rc=0
  wait -n || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    kill_all
  fi
done
if ((status != 0)); then
  for ((i = 0; i < num_processes; i++)); do
    echo "--- tail of $log_dir/process_$i.log" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2
  done
fi
exit "$status"
