#!/usr/bin/env bash
# Installs what the benchmark needs beyond scripts/bootstrap (which provides .venv and
# redis-server): nginx (run by the bench as a plain process; its system service is never
# started), Node.js with the load generator's one package (ws, pinned by package-lock.json)
# and py-spy for --profile.  perf (Debian: linux-perf) is optional.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "bench/setup.sh: missing ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "bench/setup.sh: installing ${missing[*]}"
  # nginx's postinst would start the system service; forbid service starts meanwhile.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f "$policy"
fi

[ -f node_modules/ws/package.json ] || npm ci --no-audit --no-fund
if [ -x ../.venv/bin/python ]; then
  ../.venv/bin/python -m pip install -q 'py-spy>=0.4.3'
fi
