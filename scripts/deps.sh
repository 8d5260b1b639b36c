#!/usr/bin/env bash
# Installs the Debian packages Capstan builds and tests with (idempotent).
set -euo pipefail
PKGS=(librocksdb-dev libclang-dev clang protobuf-compiler etcd-server etcd-client prometheus nftables curl faketime
      containerd runc containernetworking-plugins busybox-static docker-registry skopeo iproute2 iptables)
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
# kubectl 1.32 is not a Debian package; the tests drive the machine's
# /usr/bin/kubectl (see ../shared/KUBECTL.md) and say so if it is missing.
if ! command -v kubectl >/dev/null; then
  echo "kubectl (1.32) is required on PATH for the API tests; install it as /usr/bin/kubectl" >&2
  exit 1
fi
