#!/usr/bin/env bash
# Installs the Debian packages Capstan builds and tests with (idempotent).
set -euo pipefail
PKGS=(librocksdb-dev libclang-dev clang protobuf-compiler etcd-server etcd-client prometheus nftables)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi
