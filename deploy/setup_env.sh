#!/usr/bin/env bash
# Create (or reuse) the project's cached virtual environment and the system packages it needs.
#
# The environment lives outside the repository, keyed by the lock file and the Python version, so a
# second run (or a second checkout, or CI on the same machine) reuses it; PyPI's torch is the CUDA
# build and weighs several GB, so it must be installed once per machine, not once per run.
#
# Prints the environment's path on the last line of stdout. Everything else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${EVENTCAST_CACHE:-$HOME/.cache/eventcast}
python=${PYTHON:-python3}
lock="$here/requirements.lock"

log() { echo "[setup] $*" >&2; }

# --- system packages: redis-server and kcat from Debian, when missing -------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
# Headless Chromium renders the forecast view in its screenshot test.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing ${need_apt[*]} from Debian packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
  else
    log "missing ${need_apt[*]}: install them with your package manager (Debian: apt-get install ${need_apt[*]})"
    exit 1
  fi
fi
command -v java >/dev/null 2>&1 || { log "java (17+) not found: install a JDK, e.g. apt-get install openjdk-17-jre-headless"; exit 1; }

# --- the Python environment ------------------------------------------------------------------
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( (cat "$lock"; echo "$pyver") | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
mkdir -p "$cache"

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (first run on this machine: torch is several GB, this takes a while)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip uv >&2
  # uv keeps its own download cache (~/.cache/uv), so a rebuilt environment does not re-download.
  "$venv/bin/uv" pip sync --python "$venv/bin/python" "$lock" >&2
  touch "$venv/.complete"
else
  log "reusing $venv"
fi

# The project itself: an editable install that points at this checkout (cheap, and gives `worker`).
"$venv/bin/uv" pip install --python "$venv/bin/python" -q --no-deps -e "$here" >&2

# A convenience link for editors and the before-stop hook; ignored by git.
ln -sfn "$venv" "$here/.venv"
echo "$venv"
