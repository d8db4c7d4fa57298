#!/usr/bin/env bash
# What benchmarks/device_check.py needs carried to a GPU machine that reaches nothing: the four
# Fashion-MNIST .gz files (setup.sh installs Debian's dataset-fashion-mnist) and the wheels of
# what that machine's python lacks, all pure Python. Writes device/ (git-ignored, about 31 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p device/fashion-mnist device/wheels
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz device/fashion-mnist/
.venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d device/wheels \
  zuko pytest iniconfig pluggy packaging
du -sh device
