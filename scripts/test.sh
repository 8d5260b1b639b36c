#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and multi-process
# tests, then the negative controls (a build with planted bugs must make the
# checkers fail).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The shared target dir (.cargo/config.toml) grows with every build of every
# checkout: each change leaves its old test binaries in deps/ (it reached
# 74 GiB and a nearly full disk once, while removing only the incremental
# caches freed 4). Past 40 GiB it goes whole; a cold build costs minutes, a
# full disk costs the run.
target=/var/tmp/capstan-target
if [ -d "$target" ] && [ "$(du -s --block-size=1G "$target" | cut -f1)" -gt 40 ]; then
    echo "$target is over 40 GiB: removing it"
    rm -rf "$target"
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo test --workspace --all-targets -- --show-output
# The failpoint crash matrix (short) needs capstan built with the crash
# points; it shares this build with the negative controls.
cargo test -p capstan-control --features planted-bugs,failpoints --test negative_stale_read --test negative_dropped_watch --test negative_skipped_fsync --test failpoint_crash --test failpoint_endpoint -- --show-output
