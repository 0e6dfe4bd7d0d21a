#!/usr/bin/env bash
# napari-maskclip developer entry point. Sets up ./.venv on first use, then:
#   ./run.sh demo   the offline demo: napari with the widget and a sample (or, with no display,
#                   the CLI on the sample, writing outputs and an overlay PNG to ./demo-output)
#   ./run.sh test   the test suite (GUI tests under a virtual X server)
#   ./run.sh setup  only set up the venv
#   ./run.sh lock   refresh the lock of this platform (locks/<os>-<arch>-py<X.Y>.txt) from
#                   pyproject.toml; extra arguments go to pip-compile (e.g. --upgrade)
#
# The venv is installed with the lock of this platform as pip constraints, so every setup gets
# the versions that were tested together. Environment:
#   MASKCLIP_LOCK=FILE      use FILE as the lock instead; MASKCLIP_LOCK=none: no lock (the newest
#                           versions pyproject.toml's bounds allow)
#   MASKCLIP_LOCK_REQUIRED=1  fail when this platform has no lock (.ci/run sets it)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip"
# pip's whole output of the last setup; a failure's one line names it.
LOG="$VENV/setup.log"
# The lock refresher (its own small venv, so the project's venv holds no pip-tools).
PIP_TOOLS="pip-tools==7.7.0"

fail() {
  echo "error: $*" >&2
  exit 1
}

# The lock file for the interpreter "$1" on this machine: locks/linux-x86_64-py3.11.txt.
platform_lock() {
  local os arch ver
  os=$(uname -s | tr '[:upper:]' '[:lower:]')
  arch=$(uname -m)
  ver=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  echo "locks/$os-$arch-py$ver.txt"
}

# One line that says what to do about the pip run that failed (its output is in $LOG).
pip_failure() {
  local what="$1" lock="$2"
  local fix="read it, fix the cause, then run the same command again."
  local missing
  missing=$(grep -o -E 'requirement [^ ]+ \(from versions: none\)' "$LOG" | head -n 1 | cut -d' ' -f2 || true)
  if grep -q -E 'NewConnectionError|Temporary failure in name resolution|Network is unreachable|ConnectTimeout|ReadTimeout|ProxyError|SSLError' "$LOG"; then
    fix="the package index could not be reached: check the network (or pip's proxy/index settings) and run again."
  elif [ -n "$missing" ]; then
    fix="no package index offered any release of $missing: check the network and pip's index settings (pip config list), then run again."
  elif grep -q -E 'ResolutionImpossible|conflicting dependencies|No matching distribution found|Could not find a version that satisfies' "$LOG"; then
    if [ -n "$lock" ]; then
      fix="pyproject.toml and $lock disagree, or a pinned release is not available here: refresh the lock with ./run.sh lock (README, Development), or install without it: MASKCLIP_LOCK=none ./run.sh ..."
    else
      fix="no set of releases satisfies pyproject.toml's requirements here: relax the bound that the log names."
    fi
  fi
  fail "$what failed (pip's output: $LOG): $fix"
}

make_venv() {
  if [ -x "$VENV/bin/python" ]; then return; fi
  command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found: install Python >= 3.10, or name one: PYTHON=/path/to/python3 ./run.sh ..."
  echo "Creating $VENV with $($PYTHON --version)..." >&2
  local existed=""
  if [ -e "$VENV" ]; then existed=1; fi
  # A failed venv (no ensurepip) leaves a python without pip: remove it when this run made it.
  "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 ||
    { if [ -z "$existed" ]; then rm -rf "$VENV"; fi
      fail "$PYTHON -m venv failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv) or name another Python: PYTHON=... ./run.sh ..."; }
}

# The constraints file setup installs with ("" for none), after checking it exists.
chosen_lock() {
  local lock="${MASKCLIP_LOCK:-$(platform_lock "$VENV/bin/python")}"
  if [ "$lock" = "none" ]; then
    echo ""
  elif [ -f "$lock" ]; then
    echo "$lock"
  elif [ -n "${MASKCLIP_LOCK:-}" ]; then
    fail "MASKCLIP_LOCK=$lock: no such file (name a lock in locks/, or MASKCLIP_LOCK=none)."
  elif [ -n "${MASKCLIP_LOCK_REQUIRED:-}" ]; then
    fail "no lock for this platform ($lock): write one with ./run.sh lock (README, Development) and commit it."
  else
    echo "note: no lock for this platform ($lock): installing the newest releases pyproject.toml allows (untested together); ./run.sh lock writes one." >&2
    echo ""
  fi
}

setup() {
  local extras="$1"
  make_venv
  local lock
  lock=$(chosen_lock)
  # Reinstall only when the project's metadata, the lock or the extras changed.
  local stamp
  stamp="$VENV/.napari-maskclip-$extras-$(cat pyproject.toml ${lock:+"$lock"} | sha1sum | cut -c1-12)"
  if [ -f "$stamp" ]; then return; fi
  local constraints=()
  if [ -n "$lock" ]; then constraints=(-c "$lock" --build-constraint "$lock"); fi
  : >"$LOG"
  # pip itself from the lock too (it pins pip): pip's resolver decides what gets installed.
  echo "Installing pip${lock:+ (from $lock)}..." >&2
  $PIP install --upgrade pip ${lock:+-c "$lock"} >>"$LOG" 2>&1 || pip_failure "upgrading pip" "$lock"
  echo "Installing napari-maskclip[$extras] (editable)${lock:+ with the versions in $lock}; pip's output: $LOG..." >&2
  $PIP install -e ".[$extras]" "${constraints[@]}" >>"$LOG" 2>&1 ||
    pip_failure "installing napari-maskclip[$extras]" "$lock"
  # One Qt binding: older testing extras brought PyQt5 beside [all]'s PyQt6 (qtpy then picked
  # the deprecated PyQt5). Both extras now use PyQt6; remove a PyQt5 left in this venv.
  if "$VENV/bin/python" -c "import PyQt6.QtCore, PyQt5" 2>/dev/null; then
    echo "Removing PyQt5 from $VENV (napari-maskclip uses PyQt6)..." >&2
    $PIP uninstall -q -y PyQt5 PyQt5-Qt5 PyQt5-sip >>"$LOG" 2>&1
  fi
  rm -f "$VENV"/.napari-maskclip-"$extras"-*
  touch "$stamp"
}

# Re-resolve pyproject.toml (runtime and every extra) plus locks/pins.in with pip-tools, which
# uses pip's own resolver and configuration, into this platform's lock.
lock() {
  make_venv
  local lock tools="$VENV/lock-tools"
  lock=$(platform_lock "$VENV/bin/python")
  : >"$LOG"
  if [ ! -x "$tools/bin/pip-compile" ]; then
    echo "Installing $PIP_TOOLS into $tools..." >&2
    { "$VENV/bin/python" -m venv "$tools" &&
      "$tools/bin/python" -m pip install "$PIP_TOOLS"; } >>"$LOG" 2>&1 ||
      pip_failure "installing $PIP_TOOLS" ""
  fi
  echo "Resolving pyproject.toml and locks/pins.in into $lock; pip's output: $LOG..." >&2
  CUSTOM_COMPILE_COMMAND="./run.sh lock" "$tools/bin/pip-compile" --quiet \
    --all-extras --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --output-file "$lock" "$@" pyproject.toml locks/pins.in >>"$LOG" 2>&1 ||
    pip_failure "resolving the lock" ""
  echo "Wrote $lock: run ./run.sh test, then commit it." >&2
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
  lock)
    shift
    lock "$@"
    ;;
  *)
    echo "usage: ./run.sh demo | test [pytest args] | setup [testing|all] | lock [pip-compile args]" >&2
    exit 2
    ;;
esac
