#!/usr/bin/env bash
# System packages: Fashion-MNIST (Debian package dataset-fashion-mnist) that the tests read, and a C++
# compiler that builds the compiled CPU kernel (kernels/csrc) on first use.
# Installs what is missing with apt-get (needs root or sudo); does nothing when all is present.
set -euo pipefail
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v g++ >/dev/null || missing+=(g++)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
