#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and multi-process tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets -- --show-output
