#!/usr/bin/env bash
# napari-maskclip developer entry point. Sets up ./.venv on first use, then:
#   ./run.sh demo   the offline demo: napari with the widget and a sample (or, with no display,
#                   the CLI on the sample, writing outputs and an overlay PNG to ./demo-output)
#   ./run.sh test   the test suite (GUI tests under a virtual X server)
#   ./run.sh setup  only set up the venv
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip"

setup() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV with $($PYTHON --version)..." >&2
    "$PYTHON" -m venv "$VENV"
    $PIP install -q --upgrade pip >&2
  fi
  # Reinstall only when the project's metadata or the extras changed.
  local stamp="$VENV/.napari-maskclip-$extras-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  if [ -f "$stamp" ]; then return; fi
  if [ "$(uname -m)" = "x86_64" ] && ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    # Pinned on x86_64: on the project's build machines these come from local disk.
    echo "Installing torch 2.14.1 / torchvision 0.29.1..." >&2
    $PIP install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  fi
  echo "Installing napari-maskclip[$extras] (editable)..." >&2
  $PIP install -q -e ".[$extras]" >&2
  # One Qt binding: older testing extras brought PyQt5 beside [all]'s PyQt6 (qtpy then picked
  # the deprecated PyQt5). Both extras now use PyQt6; remove a PyQt5 left in this venv.
  if "$VENV/bin/python" -c "import PyQt6.QtCore, PyQt5" 2>/dev/null; then
    echo "Removing PyQt5 from $VENV (napari-maskclip uses PyQt6)..." >&2
    $PIP uninstall -q -y PyQt5 PyQt5-Qt5 PyQt5-sip >&2
  fi
  rm -f "$VENV"/.napari-maskclip-"$extras"-*
  touch "$stamp"
}

case "${1:-}" in
  demo)
    shift
    setup all
    exec "$VENV/bin/napari-maskclip" demo "$@"
    ;;
  test)
    shift
    setup testing
    if [ -z "${DISPLAY:-}" ] && ! command -v Xvfb >/dev/null 2>&1; then
      echo "note: no display and no Xvfb: napari GUI tests need one (Debian/Ubuntu:" \
           "apt-get install xvfb xauth libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0 ...;" \
           "see .ci/run for the full list)." >&2
    fi
    export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-xcb}
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  setup)
    setup "${2:-testing}"
    ;;
  *)
    echo "usage: ./run.sh demo | test [pytest args] | setup [testing|all]" >&2
    exit 2
    ;;
esac
