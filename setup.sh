#!/usr/bin/env bash
# Set up anneal-geo: find Python >= 3.12, create .venv, install the package with its dev
# extras from the committed constraints file (reproducible versions).
#   ./setup.sh                  # uses ./.venv
#   ANNEAL_VENV=dir ./setup.sh
#   ./setup.sh --which-python   # only say which Python a fresh setup would use
set -euo pipefail
cd "$(dirname "$0")"

VENV="${ANNEAL_VENV:-.venv}"
EXTRAS="${ANNEAL_EXTRAS:-dev}"

say() { printf '[setup] %s\n' "$*"; }

python_ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

# "3.13.0" of an interpreter, or nothing when it does not run.
python_version() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

# Every Python >= 3.12 on PATH and under pyenv, one "VERSION<tab>PATH<tab>WHERE" per line.
python_candidates() {
  local dir name candidate version
  local IFS=:
  for dir in $PATH; do
    [ -d "$dir" ] || continue
    for candidate in "$dir"/python3.* "$dir"/python3 "$dir"/python; do
      name="$(basename "$candidate")"
      case "$name" in python3.*[!0-9.]*) continue ;; esac  # python3.12-config and the like
      if [ -x "$candidate" ] && [ ! -d "$candidate" ] && python_ok "$candidate"; then
        version="$(python_version "$candidate")" && printf '%s\t%s\tPATH\n' "$version" "$candidate"
      fi
    done
  done
  unset IFS
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if [ -d "$root/versions" ]; then
    for candidate in "$root"/versions/*/bin/python; do
      if [ -x "$candidate" ] && python_ok "$candidate"; then
        version="$(python_version "$candidate")" && printf '%s\t%s\tpyenv\n' "$version" "$candidate"
      fi
    done
  fi
}

# The newest Python >= 3.12 found on PATH or under pyenv (pyenv's installs count whether or
# not pyenv itself is on PATH), as "VERSION<tab>PATH<tab>WHERE". Sorted by version number,
# newest first: each of major, minor and patch compared as numbers, descending.
find_python() {
  local best
  best="$(python_candidates | sort -t. -k1,1nr -k2,2nr -k3,3nr | sed -n 1p)"
  [ -n "$best" ] || return 1
  printf '%s\n' "$best"
}

if [ "${1:-}" = "--which-python" ]; then
  # Say which interpreter a fresh setup would use, and stop.
  if found="$(find_python)"; then
    IFS=$'\t' read -r VERSION PY WHERE <<<"$found"
    say "would use $PY, Python $VERSION (the newest >= 3.12 on PATH and under pyenv; found on $WHERE)"
    exit 0
  fi
  echo "[setup] error: no Python >= 3.12 found on PATH or under pyenv" >&2
  exit 1
fi

if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; then
  say "reusing $VENV ($("$VENV/bin/python" --version))"
else
  if ! found="$(find_python)"; then
    echo "[setup] error: no Python >= 3.12 found on PATH or under pyenv; install Python 3.12 or newer (e.g. 'pyenv install 3.12') and rerun ./setup.sh" >&2
    exit 1
  fi
  IFS=$'\t' read -r VERSION PY WHERE <<<"$found"
  say "using $PY, Python $VERSION (the newest >= 3.12 on PATH and under pyenv; found on $WHERE)"
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
if [ -x "$VENV/bin/jupyter-lab" ]; then  # the notebook extra (in dev) brings JupyterLab
  say "JupyterLab $("$VENV/bin/jupyter-lab" --version): open the notebooks with $VENV/bin/jupyter lab notebooks/"
fi
say "done. Activate with: source $VENV/bin/activate"
