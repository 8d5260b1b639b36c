#!/usr/bin/env bash
# Capstan's store against etcd, same loads, same machine, same run.
#
#   benches/compare-etcd.sh                 # default loads (below)
#   benches/compare-etcd.sh "LOAD" ...      # each LOAD: `capstan-bench store` flags
#   e.g. benches/compare-etcd.sh "--workload put --clients 100 --conns 10 --total 20000"
#
# 1. Starts a 3-member etcd cluster (Debian's etcd-server, 3.4) on free
#    loopback ports, runs every load against it in order, stops it.
# 2. Starts a 3-master Capstan cluster with `capstan up --data-dir <tmp>
#    --masters 3`, waits for `<tmp>/etcdctl.env` to list all 3 endpoints,
#    runs the same loads against it in order, stops it (SIGINT, then SIGTERM,
#    then SIGKILL).
# 3. Prints each run's JSON line and a table: throughput, p99 and the ratios
#    capstan/etcd throughput and etcd/capstan p99 (both > 1 means Capstan is
#    better).
#
# Loads run in sequence on one cluster, so the default range-linear load
# reads the keys the put load wrote. Both clusters keep their data on the
# same filesystem (under $BENCH_TMP).
#
# Environment:
#   CAPSTAN    capstan binary (default /var/tmp/capstan-target/release/capstan)
#   BENCH      capstan-bench binary (default .../release/capstan-bench; built
#              with cargo if missing)
#   TLS        1 (default): etcd serves mutual TLS like Capstan does, so both
#              pay for TLS. 0: etcd plaintext, and Capstan via `capstan up
#              --plaintext` and CAPSTAN_PLAINTEXT_ENDPOINTS from etcdctl.env.
#   BENCH_TMP  parent of the temporary directory (default /var/tmp)
#   KEEP_TMP   1: keep the temporary directory (logs, data) for inspection
#   ONLY       etcd or capstan: run one side only
#
# Everything listens on 127.0.0.1 only; everything started here is stopped by
# PID on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET=/var/tmp/capstan-target/release
CAPSTAN="${CAPSTAN:-$TARGET/capstan}"
BENCH="${BENCH:-$TARGET/capstan-bench}"
TLS="${TLS:-1}"
ONLY="${ONLY:-}"

if (($# == 0)); then
  set -- \
    "--workload put --clients 1000 --conns 100 --value-size 256 --total 200000" \
    "--workload range-linear --clients 1000 --conns 100 --value-size 256 --total 200000"
fi
LOADS=("$@")

log() { echo "[compare-etcd $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in etcd etcdctl jq ss; do
  command -v "$tool" >/dev/null || die "$tool not found (bash scripts/deps.sh installs etcd; jq, ss come with Debian)"
done
[[ "$TLS" == 0 ]] || command -v openssl >/dev/null || die "openssl not found (needed for TLS=1)"
if [[ ! -x "$BENCH" ]]; then
  log "building capstan-bench"
  (cd "$ROOT" && cargo build --release -q -p capstan-bench)
fi
[[ "$ONLY" == etcd || -x "$CAPSTAN" ]] || die "no capstan binary at $CAPSTAN (set CAPSTAN, or cargo build --release -p capstan-control)"

TMP="$(mktemp -d "${BENCH_TMP:-/var/tmp}/capstan-compare.XXXXXX")"
PIDS=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops one process started here: signals in order, waiting between them.
stop_pid() {
  local pid=$1 grace=$2 sig
  shift 2
  for sig in "$@"; do
    kill -0 "$pid" 2>/dev/null || break
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# A free loopback TCP port, not handed out before in this run.
USED_PORTS=" "
free_port() {
  local p
  while :; do
    p=$(shuf -i 20000-45000 -n 1)
    [[ "$USED_PORTS" == *" $p "* ]] && continue
    ss -Htan "( sport = :$p )" | grep -q . && continue
    USED_PORTS+="$p "
    echo "$p"
    return
  done
}

# Runs every load against one cluster: run_loads NAME ENDPOINTS [TLS FLAGS...]
run_loads() {
  local name=$1 eps=$2 i=0 load
  shift 2
  for load in "${LOADS[@]}"; do
    i=$((i + 1))
    log "$name load $i: $load"
    # In the background, so that a signal to this script is handled at once
    # (bash runs traps only between foreground commands).
    # shellcheck disable=SC2086 # a load is a list of flags
    "$BENCH" store --endpoints "$eps" "$@" $load >"$TMP/$name-$i.json" 2>"$TMP/$name-$i.err" &
    local bp=$! rc=0
    PIDS+=("$bp")
    wait "$bp" || rc=$?
    stop_pid "$bp" 1 KILL
    ((rc == 0)) || { tail -20 "$TMP/$name-$i.err" >&2; die "$name load $i failed"; }
    log "$name load $i: $(cat "$TMP/$name-$i.json")"
  done
}

make_certs() {
  local d=$TMP/pki
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
      -subj /CN=compare-etcd-ca -days 2
    for n in server client; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj /CN=$n
    done
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >server.ext
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    for n in server client; do
      openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile $n.ext
    done
  ) >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; die "making test certificates failed"; }
}

run_etcd() {
  local scheme=http tlsflags=() ctlflags=() benchflags=()
  if [[ "$TLS" != 0 ]]; then
    make_certs
    local d=$TMP/pki
    scheme=https
    tlsflags=(--cert-file "$d/server.crt" --key-file "$d/server.key" --trusted-ca-file "$d/ca.crt" --client-cert-auth
      --peer-cert-file "$d/server.crt" --peer-key-file "$d/server.key" --peer-trusted-ca-file "$d/ca.crt"
      --peer-client-cert-auth)
    ctlflags=(--cacert "$d/ca.crt" --cert "$d/client.crt" --key "$d/client.key")
    benchflags=("${ctlflags[@]}")
  fi
  local names=(e1 e2 e3) cport=() pport=() i cluster="" eps=""
  for i in 0 1 2; do
    cport[i]=$(free_port)
    pport[i]=$(free_port)
    cluster+="${cluster:+,}${names[i]}=$scheme://127.0.0.1:${pport[i]}"
    eps+="${eps:+,}$scheme://127.0.0.1:${cport[i]}"
  done
  local pids=()
  for i in 0 1 2; do
    etcd --name "${names[i]}" --data-dir "$TMP/etcd/${names[i]}" \
      --listen-client-urls "$scheme://127.0.0.1:${cport[i]}" --advertise-client-urls "$scheme://127.0.0.1:${cport[i]}" \
      --listen-peer-urls "$scheme://127.0.0.1:${pport[i]}" --initial-advertise-peer-urls "$scheme://127.0.0.1:${pport[i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token compare-etcd \
      "${tlsflags[@]}" >"$TMP/etcd-${names[i]}.log" 2>&1 &
    PIDS+=($!)
    pids+=($!)
  done
  log "etcd: 3 members (pids ${pids[*]}) at $eps"
  wait_healthy "$eps" "${ctlflags[@]}" || { tail -5 "$TMP"/etcd-*.log >&2; die "etcd did not become healthy in 30 s"; }
  log "etcd: $(etcd --version | head -1), healthy"
  run_loads etcd "$eps" "${benchflags[@]}"
  for i in "${pids[@]}"; do stop_pid "$i" 10 TERM KILL; done
  log "etcd: stopped"
}

# wait_healthy ENDPOINTS [etcdctl TLS flags...]: up to 30 s for `endpoint health`.
wait_healthy() {
  local eps=$1
  shift
  for _ in $(seq 60); do
    ETCDCTL_API=3 etcdctl --endpoints "$eps" "$@" --command-timeout=2s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

# Reads one variable from etcdctl.env without sourcing it into this shell.
env_var() { (set +u; . "$1" >/dev/null 2>&1; eval "printf '%s' \"\${$2:-}\""); }

run_capstan() {
  local dir=$TMP/capstan upflags=()
  [[ "$TLS" == 0 ]] && upflags=(--plaintext)
  # Job control on for the spawn: a background job of a non-interactive
  # shell would otherwise start with SIGINT ignored.
  set -m
  "$CAPSTAN" up --data-dir "$dir" --masters 3 "${upflags[@]}" >"$TMP/capstan-up.log" 2>&1 &
  local pid=$!
  set +m
  PIDS+=("$pid")
  log "capstan: up (pid $pid), waiting for $dir/etcdctl.env to list 3 endpoints"
  local envf=$dir/etcdctl.env eps="" n=0
  for _ in $(seq 120); do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$TMP/capstan-up.log" >&2; die "capstan up exited"; }
    if [[ -s "$envf" ]] && grep -q '^export ETCDCTL_KEY=' "$envf"; then
      if [[ "$TLS" == 0 ]]; then eps=$(env_var "$envf" CAPSTAN_PLAINTEXT_ENDPOINTS); else eps=$(env_var "$envf" ETCDCTL_ENDPOINTS); fi
      n=$(tr ',' '\n' <<<"$eps" | grep -c . || true)
      ((n >= 3)) && break
    fi
    sleep 0.5
  done
  ((n >= 3)) || { tail -20 "$TMP/capstan-up.log" >&2; die "no etcdctl.env with 3 endpoints after 60 s"; }
  local cacert cert key benchflags=() ctlflags=()
  cacert=$(env_var "$envf" ETCDCTL_CACERT)
  cert=$(env_var "$envf" ETCDCTL_CERT)
  key=$(env_var "$envf" ETCDCTL_KEY)
  if [[ "$TLS" != 0 ]]; then
    benchflags=(--cacert "$cacert" --cert "$cert" --key "$key")
    ctlflags=("${benchflags[@]}")
  fi
  wait_healthy "$eps" "${ctlflags[@]}" || { tail -20 "$TMP/capstan-up.log" >&2; die "capstan endpoints not healthy in 30 s"; }
  log "capstan: healthy at $eps"
  run_loads capstan "$eps" "${benchflags[@]}"
  stop_pid "$pid" 20 INT TERM KILL
  log "capstan: stopped"
}

[[ "$ONLY" == capstan ]] || run_etcd
[[ "$ONLY" == etcd ]] || run_capstan

# Results: raw JSON lines, then the table.
echo "# $(date -u +%FT%TZ) $(uname -n) nproc=$(nproc) TLS=$TLS"
for i in $(seq ${#LOADS[@]}); do
  for side in etcd capstan; do
    [[ -s "$TMP/$side-$i.json" ]] && echo "$side load $i: $(cat "$TMP/$side-$i.json")"
  done
done
echo
printf '%-14s %8s %8s %10s %10s %8s %9s %9s %8s\n' \
  workload clients conns etcd/s capstan/s ratio etcd_p99 cap_p99 ratio
for i in $(seq ${#LOADS[@]}); do
  e="$TMP/etcd-$i.json" c="$TMP/capstan-$i.json"
  [[ -s "$e" || -s "$c" ]] || continue
  [[ -s "$e" ]] || e=/dev/null
  [[ -s "$c" ]] || c=/dev/null
  jq -rn --slurpfile e "$e" --slurpfile c "$c" '
    ($e[0] // {}) as $e | ($c[0] // {}) as $c | ($e + $c) as $any
    | def r(a; b): if (a|type) == "number" and (b|type) == "number" and b > 0 then (a / b * 100 | round / 100 | tostring) else "-" end;
      def n(x): if x == null then "-" else (x | tostring) end;
    [ $any.workload, n($any.clients), n($any.conns),
      n($e.throughput_per_s | if . then round else null end), n($c.throughput_per_s | if . then round else null end),
      r($c.throughput_per_s; $e.throughput_per_s),
      n($e.latency_ms.p99), n($c.latency_ms.p99), r($e.latency_ms.p99; $c.latency_ms.p99) ]
    | @tsv' | awk -F'\t' '{ printf "%-14s %8s %8s %10s %10s %8s %9s %9s %8s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }'
done
echo "(ratio 1 = capstan/etcd throughput; ratio 2 = etcd/capstan p99 latency; > 1 favours Capstan)"
