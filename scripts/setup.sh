#!/usr/bin/env bash
# Sets cputune up on a fresh Debian/Ubuntu x86-64 machine, into ./.venv.
#   scripts/setup.sh           system packages + cputune (enough for `cputune probe`)
#   scripts/setup.sh --tests   also the test tools, the llama.cpp build (~15 min on 2 cores,
#                              cached afterwards), llama-cpp-python linked to that build, and
#                              the ik_llama.cpp build (~17 min more on 2 cores, cached)
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--tests" ] && want_tests=1

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# gcc/OpenMP and Python headers build the probe's C extension; cmake/ccache build llama.cpp;
# libnuma-dev gives numaif.h (mbind); numactl is what `cputune serve` pins with.
pkgs="build-essential cmake ccache numactl libnuma-dev python3-dev python3-venv git"
missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "== installing system packages:$missing"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_tests" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  .venv/bin/cputune build --python
  # The second engine. CI and the dev machines have a source snapshot of the pinned commit
  # vendored beside the repository (../shared/vendor/README.md) and no network, so it is built
  # from that; anywhere else cputune clones the commit pinned in configs/engines.toml from git.
  ik_snapshot=""
  for f in ../shared/vendor/ik_llama.cpp-*.tar.gz; do
    [ -f "$f" ] && ik_snapshot="$f"
  done
  if [ -n "$ik_snapshot" ]; then
    .venv/bin/cputune build --engine ik_llama --source "$ik_snapshot"
  else
    .venv/bin/cputune build --engine ik_llama
  fi
else
  .venv/bin/python -m pip install -q -e ".[report]"
fi
echo "== cputune is installed in .venv ($(.venv/bin/cputune --version))"
