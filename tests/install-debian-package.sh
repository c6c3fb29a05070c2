#!/usr/bin/env bash
# Install one of Debian's packages for the tests, unless the programs it
# provides are on PATH already:
#
#   tests/install-debian-package.sh PACKAGE PROGRAM...
#
# `make setup` installs prometheus (prometheus, promtool) for the monitoring
# tests and redis-server for the fleet tests. The package's own service is
# kept from starting: the tests start their own, on loopback.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 PACKAGE PROGRAM..." >&2
    exit 2
fi
package=$1
shift

missing=0
for program in "$@"; do
    command -v "$program" >/dev/null || missing=1
done
if [ "$missing" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install $package ($* on PATH), then rerun" >&2
    exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "installing $package needs root: run 'make setup' as root once" >&2
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

echo "installing Debian's $package package for the tests" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$package" >/dev/null
