#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and multi-process
# tests, then the negative controls (a build with planted bugs must make the
# checkers fail).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo test --workspace --all-targets -- --show-output
cargo test -p capstan-control --features planted-bugs --test negative_stale_read --test negative_dropped_watch -- --show-output
