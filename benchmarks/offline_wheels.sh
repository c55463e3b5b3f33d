#!/usr/bin/env bash
# Wheels for a GPU machine with no network whose Python already holds torch, transformers,
# lightning, sentence-transformers and the like (a lent H100/H200 here): the project's other
# dependencies, at the versions installed in THIS environment (where the tests pass), for
# CPython 3.12 on x86-64 Linux. About 7 MB.
#
#   benchmarks/offline_wheels.sh [DIR]        (default .whl; then, on that machine:)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 benchmarks/gpu_check.sh
set -euo pipefail
DIR=${1:-.whl}
PYTHON=${PYTHON:-python}
# What the project needs beyond such an image (read off one in 2026-11), with what they need.
PACKAGES=(datasets dill multiprocess jsonargparse docstring-parser typeshed-client omegaconf
    soundfile cffi pycparser torchdata pydantic pydantic-core annotated-types
    typing-inspection tzdata)
pinned=()
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -m pip show "$package" 2>/dev/null | sed -n "s/^Version: //p" || true)
    pinned+=("$package${version:+==$version}")
done
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${pinned[@]}"
ls "$DIR"
