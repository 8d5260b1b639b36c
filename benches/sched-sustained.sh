#!/bin/bash
# The scheduler benchmark run again and again on one cluster, the way a
# long-lived cluster sees it: each run's pods and nodes are still being
# deleted while the next run creates its own, and the store grows until
# Raft snapshots are taken under load.
#
#   [MASTERS=1] benches/sched-sustained.sh <dir with capstan and capstan-bench> [runs]
#
# Starts `capstan up --nodes 0` (3 masters, or $MASTERS) in a fresh temporary data dir, runs
# `capstan-bench scheduler --mode plain` <runs> times (default 3), then once
# with `--mode anti`, and prints per run the bound pods/s, latency, the CPU
# each master and the bench spent in the pod phase (and per pod), the
# masters' CPU ticks (utime+stime, 100/s) and at the end each master's
# snapshot build time, size and RSS. Stops only the `capstan up` it started.
set -euo pipefail
bin=$(cd "$1" && pwd)
runs=${2:-3}
dir=$(mktemp -d /tmp/capstan-sched-XXXXXX)
setsid "$bin/capstan" up --data-dir "$dir" --nodes 0 --masters "${MASTERS:-3}" --no-demo \
    --server-arg=--node-monitor-grace-period=600 >"$dir.up.log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$dir" "$dir.up.log"' EXIT
for _ in $(seq 120); do
    grep -q "cluster up" "$dir.up.log" 2>/dev/null && break
    sleep 1
done
grep -q "cluster up" "$dir.up.log" || { echo "cluster did not come up" >&2; cat "$dir.up.log" >&2; exit 1; }
metrics=$(grep -o "127.0.0.1:[0-9]*" "$dir/prometheus.yml" | paste -sd,)
masters=$(pgrep -P $up -f "capstan --log-level info server" | tr '\n' ' ')
ticks() { for p in $masters; do awk '{printf "%s ", $14+$15}' /proc/$p/stat; done; }
summary='import json, sys
d = json.load(sys.stdin)
a = d.get("algorithm") or {}
c = d.get("cpu") or {}
print("bound/s", d["bound_per_s"], "p50", d["latency_ms"]["p50"], "p99", d["latency_ms"]["p99"],
      "scheduler us/pod", a.get("us_per_pod"), "timed_out", d["timed_out"],
      "| pod phase cpu s: masters", c.get("masters_s"), "bench", c.get("bench_s"), "ms/pod", c.get("ms_per_pod"))'
echo "# $(date -u +%FT%TZ) $("$bin/capstan" --version 2>/dev/null || true) masters (pids): $masters"
bench() {
    "$bin/capstan-bench" scheduler --kubeconfig "$dir/kubeconfig" --nodes 5000 --metrics "$metrics" "$@" 2>/dev/null
}
for run in $(seq "$runs"); do
    before=$(ticks)
    out=$(bench --pods 10000 --mode plain)
    echo "plain run $run: $(echo "$out" | python3 -c "$summary") | master cpu ticks [$before] -> [$(ticks)]"
done
before=$(ticks)
out=$(bench --pods 5000 --mode anti)
echo "anti: $(echo "$out" | python3 -c "$summary") | master cpu ticks [$before] -> [$(ticks)]"
for m in ${metrics//,/ }; do
    curl -s "$m/metrics" | grep -E "^(capstan_raft_is_leader|capstan_raft_snapshot_build_duration_seconds_(sum|count)|capstan_raft_snapshot_size_bytes|process_resident_memory_bytes) " | paste -sd' '
done
