#!/usr/bin/env bash
# System packages, in two sets:
#   run   what serving needs: a C++ compiler that builds the compiled CPU kernel (kernels/csrc) on first use.
#   test  run's, plus what only the tests and benchmarks use: Fashion-MNIST (Debian package
#         dataset-fashion-mnist), the PostgreSQL server binaries (initdb, pg_ctl) the PostgreSQL store's
#         tests run a throwaway cluster with, headless Chromium with its WebDriver that the web console's
#         tests drive, and wrk, the HTTP load tool of the server benchmarks.
# Usage: bash tools/system-deps.sh run|test
# Installs what is missing with apt-get (needs root or sudo); does nothing when all is present.
set -euo pipefail
set_name="${1:-}"
if [ "$set_name" != run ] && [ "$set_name" != test ]; then
    echo "usage: bash tools/system-deps.sh run|test" >&2
    exit 2
fi
missing=()
command -v g++ >/dev/null || missing+=(g++)
if [ "$set_name" = test ]; then
    [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
    command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    command -v wrk >/dev/null || missing+=(wrk)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
