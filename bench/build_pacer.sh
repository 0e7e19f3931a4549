#!/usr/bin/env bash
# Build bench/pacer.c (the bench's paced producer, on librdkafka) once per source version and print
# the binary's path on the last line of stdout; everything else goes to stderr.
#
# The binary lives outside the repository, in $EVENTCAST_CACHE (default ~/.cache/eventcast)/
# pacer-<hash of the source and this script>/pacer, and is reused while it exists: nothing built
# is ever committed. It needs a C compiler and librdkafka's headers (Debian: gcc, librdkafka-dev);
# when they are missing and this runs as root on a machine with apt-get, they are installed, as
# deploy/setup_env.sh does for redis-server and kcat (only the bench and its test need them, so
# setup_env, and with it `make test`'s set-up, does not). Exit 2, with a message starting
# "missing", when they are missing and cannot be installed; any other failure is a build error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src="$here/pacer.c"
cache=${EVENTCAST_CACHE:-$HOME/.cache/eventcast}
key=$(cat "$src" "$0" | sha256sum | cut -c1-16)
out="$cache/pacer-$key"

log() { echo "[pacer] $*" >&2; }

if [ -x "$out/pacer" ]; then
  echo "$out/pacer"
  exit 0
fi

has_headers() {
  echo '#include <librdkafka/rdkafka.h>' | ${CC:-cc} -E -x c - >/dev/null 2>&1
}

need_apt=()
command -v "${CC:-cc}" >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ ${#need_apt[@]} -gt 0 ] || ! has_headers; then
  need_apt+=(librdkafka-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing ${need_apt[*]} from Debian packages"
    if ! { apt-get update -qq >&2 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2; }; then
      log "missing ${need_apt[*]}, and apt-get could not install them"
      exit 2
    fi
  else
    log "missing ${need_apt[*]}: install them with your package manager" \
        "(Debian: apt-get install ${need_apt[*]})"
    exit 2
  fi
fi

# Flags from pkg-config when it knows librdkafka, else the plain library name.
libs=$(pkg-config --cflags --libs rdkafka 2>/dev/null || echo "-lrdkafka")
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/pacer-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086  # $libs is a list of flags
${CC:-cc} -O2 -Wall -Wextra -o "$tmp/pacer" "$src" $libs >&2
# Another build of the same source may have finished meanwhile: either result is the same binary.
mkdir -p "$out"
mv -f "$tmp/pacer" "$out/pacer"
log "built $out/pacer"
echo "$out/pacer"
