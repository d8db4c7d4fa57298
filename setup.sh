#!/usr/bin/env bash
# Set up VanVAE from a fresh clone: a virtual environment with the requirements, and real
# Fashion-MNIST from Debian's package where apt-get can install it (no download needed).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "setup.sh: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded instead" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt pytest ruff
