#!/usr/bin/env bash
# Bring a local cluster up on loopback (three masters, one containerd node, a
# demo workload): scripts/up.sh [data-dir] [masters] [more capstan up flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p capstan-control -p capstan-node
DIR="${1:-/tmp/capstan}"
MASTERS="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))
exec /var/tmp/capstan-target/release/capstan up --data-dir "$DIR" --masters "$MASTERS" "$@"
