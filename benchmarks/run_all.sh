#!/usr/bin/env bash
# Re-run every benchmark at the current commit, one after another (never beside the test suite: 2 cores), each
# writing benchmarks/results/<name>.json with the commit, CPU and load average. A failing benchmark does not stop
# the others; the exit code says whether any failed. gpu_check runs only where nvidia-smi sees a GPU.
#   benchmarks/run_all.sh [name ...]      (default: all, in the order below)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ALL=(predict caching finetune score_quality click_score_fit clicks small_projects families runtimes scale webhooks training_loop
     training_concurrency startup robustness)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ALL+=(gpu_check); fi
names=("${@:-${ALL[@]}}")
failed=()
for name in "${names[@]}"; do
  [ -f "benchmarks/$name.py" ] || { echo "no benchmark benchmarks/$name.py" >&2; failed+=("$name"); continue; }
  started=$(date +%s)
  echo "== $name ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
  if ! "$PY" -m "benchmarks.$name"; then failed+=("$name"); fi
  echo "== $name: $(( $(date +%s) - started )) s"
done
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
