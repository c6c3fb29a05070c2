#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's packages, for the monitoring
# tests, unless both are on PATH already. The package's own service is kept
# from starting: the tests start Prometheus themselves, on loopback.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install Prometheus 2.x (prometheus and promtool on PATH), then rerun" >&2
    exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "installing Prometheus needs root: run 'make setup' as root once" >&2
        exit 1
    fi
    as_root=(sudo)
fi

# invoke-rc.d asks policy-rc.d whether to start a service; 101 says no.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod +x "$policy"
    trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi

echo "installing Debian's prometheus package for the monitoring tests" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
