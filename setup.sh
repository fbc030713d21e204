#!/usr/bin/env bash
# Set up anneal-geo: find Python >= 3.12, create .venv, install the package with its dev
# extras from the committed constraints file (reproducible versions).
#   ./setup.sh            # uses ./.venv
#   ANNEAL_VENV=dir ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"

VENV="${ANNEAL_VENV:-.venv}"
EXTRAS="${ANNEAL_EXTRAS:-dev}"

say() { printf '[setup] %s\n' "$*"; }

python_ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

find_python() {
  local candidate
  # 1. PATH, newest first.
  for candidate in python3.13 python3.12 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$(command -v "$candidate")"; then
      command -v "$candidate"; return 0
    fi
  done
  # 2. pyenv installs (newest first), whether or not pyenv is on PATH.
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if [ -d "$root/versions" ]; then
    for candidate in $(ls -1 "$root/versions" | grep -E '^3\.[0-9]+(\.[0-9]+)?$' | sort -t. -k1,1n -k2,2n -k3,3n -r); do
      if [ -x "$root/versions/$candidate/bin/python" ] && python_ok "$root/versions/$candidate/bin/python"; then
        echo "$root/versions/$candidate/bin/python"; return 0
      fi
    done
  fi
  return 1
}

if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; then
  say "reusing $VENV ($("$VENV/bin/python" --version))"
else
  if ! PY="$(find_python)"; then
    echo "[setup] error: no Python >= 3.12 found on PATH or under pyenv; install Python 3.12 or newer (e.g. 'pyenv install 3.12') and rerun ./setup.sh" >&2
    exit 1
  fi
  say "using $PY ($("$PY" --version))"
  rm -rf "$VENV"
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi

say "upgrading pip"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
say "installing anneal-geo[$EXTRAS] with constraints.txt (torch, torchgeo, faiss, rasterio, ...; the first run downloads a few GB)"
"$VENV/bin/python" -m pip install --quiet --progress-bar off -c constraints.txt -e ".[$EXTRAS]"
say "installing the example plugins (plugins/*)"
for plugin in plugins/*/; do
  "$VENV/bin/python" -m pip install --quiet --progress-bar off -c constraints.txt -e "$plugin"
done
say "checking the install"
"$VENV/bin/anneal-geo" --version
say "done. Activate with: source $VENV/bin/activate"
