#!/usr/bin/env bash
# Runs a command on every worker of a Cloud TPU VM slice, one JAX process per
# worker host: creates the slice unless it exists, installs the committed HEAD
# of this repository with jax[tpu] on all workers, then runs the command there.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P]
#       [--accelerator-type v4-32] [--version tpu-ubuntu2204-base]
#       [--python python3.11] [--skip-setup] [--dry-run] -- CMD...
#
# CMD runs in ~/isr_dpo_jax with the virtual environment on PATH; the processes
# find each other through the TPU metadata server (isr_dpo_jax.distributed).
# --dry-run prints the commands instead of running them (the slice is taken
# to be absent).
set -euo pipefail

usage() {
  echo "usage: $0 --name NAME --zone ZONE [--project P]" \
    "[--accelerator-type T] [--version V] [--python PYTHON] [--skip-setup]" \
    "[--dry-run] -- CMD..." >&2
  exit 2
}

name=
zone=
project=
accelerator_type=v4-32
version=tpu-ubuntu2204-base
python=python3.11
setup=true
dry_run=false
while (($#)); do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --accelerator-type) accelerator_type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --skip-setup) setup=false; shift ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
if [[ -z $name || -z $zone ]] || (($# == 0)); then
  usage
fi

# Prints a command as it would be typed: single quotes where a word needs them.
show() {
  local word words=()
  for word; do
    if [[ $word =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

run() {
  if $dry_run; then
    show "$@"
  else
    "$@"
  fi
}

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
if [[ -n $project ]]; then
  where+=(--project="$project")
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2016  # $HOME expands on the workers.
remote_dir='$HOME/isr_dpo_jax' remote_venv='$HOME/isr_dpo_venv'

on_workers=("${tpu_vm[@]}" ssh "$name" --worker=all "${where[@]}")

if $dry_run || ! "${tpu_vm[@]}" describe "$name" "${where[@]}" &>/dev/null; then
  run "${tpu_vm[@]}" create "$name" "${where[@]}" \
    --accelerator-type="$accelerator_type" --version="$version"
fi

if $setup; then
  tarball="${TMPDIR:-/tmp}/isr_dpo_jax.tar.gz"
  run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
  run "${tpu_vm[@]}" scp "$tarball" "$name:isr_dpo_jax.tar.gz" \
    --worker=all "${where[@]}"
  apt_python="sudo apt-get -qq update"
  apt_python+=" && sudo apt-get -qq install -y $python $python-venv"
  install=(
    "{ command -v $python >/dev/null || { $apt_python; }; }"
    "{ [ -x $remote_venv/bin/pip ] || $python -m venv $remote_venv; }"
    "rm -rf $remote_dir" "mkdir -p $remote_dir"
    "tar -xzf isr_dpo_jax.tar.gz -C $remote_dir"
    "$remote_venv/bin/pip install -q --upgrade pip"
    "$remote_venv/bin/pip install -q -e \"${remote_dir}[tpu]\""
  )
  install_line=$(printf ' && %s' "${install[@]}")
  run "${on_workers[@]}" --command="${install_line# && }"
fi

# JAX_PLATFORMS=tpu: fail on a broken TPU runtime instead of running on CPU.
command_line=$(printf '%q ' "$@")
run "${on_workers[@]}" --command="cd $remote_dir \
&& PATH=$remote_venv/bin:\$PATH JAX_PLATFORMS=tpu ${command_line% }"
