#!/usr/bin/env bash
# Installs qsmnode on a fresh Debian/Ubuntu machine into ./.venv.
#   ./install.sh          the node and its DICOM tools (dcmtk for storescu/echoscu)
#   ./install.sh --test   also the test tools: Orthanc (the test PACS), dicom3tools (dciodvfy), test extras
# Needs root for apt-get (or sudo). Idempotent: run it again after pulling.
set -euo pipefail
cd "$(dirname "$0")"

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

apt_packages=(dcmtk python3-venv)
[ "$with_tests" = 1 ] && apt_packages+=(orthanc orthanc-dicomweb dicom3tools)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    as_root apt-get update -qq
    # policy-rc.d keeps Debian from starting Orthanc as a system service on install: tests start their own.
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$with_tests" = 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    .venv/bin/python -m pip install -q -e .
fi
echo "install.sh: qsmnode $(.venv/bin/qsmnode --version | cut -d' ' -f2) installed in .venv"
