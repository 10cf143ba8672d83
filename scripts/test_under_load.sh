#!/usr/bin/env bash
# `make test` on a fresh clone of HEAD while two busy loops keep both cores of this machine occupied: the suite must
# hold on a busy machine (no wall-clock asserts, every wait on an observed event).
#     bash scripts/test_under_load.sh [CLONE_DIR]        (default /tmp/diffguide-under-load; prints the count and time)
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
clone=${1:-/tmp/diffguide-under-load}
rm -rf "$clone" && git clone -q "$repo" "$clone" && cd "$clone" || exit 1
python -c "while 1: pass" & a=$!
python -c "while 1: pass" & b=$!
trap 'kill $a $b 2>/dev/null' EXIT
start=$(date +%s)
make test; status=$?
echo "make test under load: exit $status in $(( $(date +%s) - start )) s"
exit $status
