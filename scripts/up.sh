#!/usr/bin/env bash
# Bring a local three-master cluster up on loopback: scripts/up.sh [data-dir] [masters]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p capstan-control
DIR="${1:-/tmp/capstan}"
exec /var/tmp/capstan-target/release/capstan up --data-dir "$DIR" --masters "${2:-3}"
