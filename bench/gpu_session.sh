#!/usr/bin/env bash
# The two prepared commands of a GPU session (docs/gpu.md), run in the checkout on the GPU machine.
#   bash bench/gpu_session.sh check   # call 1, carries .gpu_bundle/part1: bench/gpu_check.py
#   bash bench/gpu_session.sh table   # call 2, carries .gpu_bundle/part2: restore + the --profile gpu table
# Results are written to $OUT (at most 8 files come back: the table's per-cell files travel as
# one archive); copy them into bench/results/ and docs/results/ here. TABLE_BUDGET (seconds, default
# 420) bounds the table command: no cell starts after it.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh check|table}
out=${OUT:-outputs/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case "$stage" in
  check)
    # straight into $OUT: the report is rewritten after every row, so a run stopped at the
    # time limit still brings back what it checked
    $py -m bench.gpu_check --out "$out" 2>&1 | tee "$out/gpu_check.log"
    status=$?
    ;;
  table)
    $py -m bench.gpu_bundle restore --bundle .gpu_bundle --faces .gpu_faces --cache .gpu_cache 2>&1 | tee "$out/restore.log" || exit 3
    $py -m bench.kd_table --profile gpu --faces .gpu_faces --cache .gpu_cache --budget "${TABLE_BUDGET:-420}" \
      2>&1 | tee "$out/kd_table_gpu.log"
    status=$?
    tar czf "$out/kd_table_gpu.tgz" bench/results/kd_table/gpu docs/results/kd_table_gpu* 2>/dev/null
    ;;
  *)
    echo "unknown stage $stage (check or table)" >&2
    exit 2
    ;;
esac
exit "$status"
