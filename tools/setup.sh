#!/usr/bin/env bash
# Set up everything napari-registration needs on a fresh Debian machine:
# the system libraries for headless Qt (Xvfb, xcb, GL) when run as root, and a
# virtual environment in .venv with the package, napari (PyQt6) and the test tools.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 \
libxcb-render-util0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1 \
libglib2.0-0 libfontconfig1 libdbus-1-3"

if command -v dpkg >/dev/null 2>&1; then
  missing=""
  for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing system packages:$missing" >&2
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
      echo "setup: missing system packages (Qt widget tests need them):$missing" >&2
      echo "setup: run as root or: sudo apt-get install -y$missing" >&2
    fi
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[testing]"
echo "setup: ready (.venv)" >&2
