#!/usr/bin/env bash
# Install the Debian packages listed in ci/system-packages.txt that are missing.
# Runs `apt-get update` first, as a fresh machine's package lists may be empty
# or stale; does nothing (and needs no network) when all are present.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/system-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -q
# Without recommends: QEMU's pull in GStreamer, speech recognition and more it never uses here.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
