#!/usr/bin/env bash
# Runs `systemd-analyze verify` on the units and fails on any message, since verify itself only
# warns (exit 0) about unknown keys and bad values.
set -uo pipefail
analyze=$1
dir=$2
cd "$dir" || exit 1
out=$("$analyze" verify --man=no ./weightd.socket ./weightd.service 2>&1)
rc=$?
if [[ $rc -ne 0 || -n "$out" ]]; then
  echo "systemd-analyze verify reported problems (rc=$rc):"
  echo "$out"
  exit 1
fi
echo "weightd.socket and weightd.service verified clean"
