#!/usr/bin/env bash
# Downloads the wheels that scripts/gpu_check.sh installs on a GPU machine without network access: the packages
# its tests and scripts/benchmark.py import besides JAX (flax, optax, gin-config, pytest, pytest-xdist, numpy, and
# what they need, orbax-checkpoint and tensorstore among them), at constraints.txt's versions, for Linux x86-64.
# Run it on a machine with internet; carry the folder to the GPU machine and run WHEELHOUSE=<folder>
# scripts/gpu_check.sh there. jax and jaxlib are left out: the GPU machine's CUDA build of JAX stays.
#
#   scripts/make_wheelhouse.sh                               # -> wheelhouse/, for CPython 3.11
#   PYTHON_VERSION=3.12 scripts/make_wheelhouse.sh gin-config # only what the GPU machine lacks, for its Python
#
# Settings (environment): WHEELHOUSE (wheelhouse), PYTHON_VERSION (3.11: the GPU machine's python3 -V),
# PYTHON (python3, whose pip downloads). Arguments: the packages (default: the list above).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELHOUSE:-wheelhouse}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
PYTHON=${PYTHON:-python3}
if [ $# -gt 0 ]; then PACKAGES=("$@"); else PACKAGES=(flax optax gin-config pytest pytest-xdist numpy); fi
mkdir -p "$DEST"
# Binary wheels only (the GPU machine may have no compiler), for every manylinux tag such a machine accepts.
"$PYTHON" -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -c constraints.txt "${PACKAGES[@]}"
# jax, jaxlib and scipy (a dependency of jax alone, 35 MB) are there wherever JAX is.
rm -f "$DEST"/jax-[0-9]*.whl "$DEST"/jaxlib-[0-9]*.whl "$DEST"/scipy-[0-9]*.whl
echo "$(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST for CPython $PYTHON_VERSION" \
     "on Linux x86-64 (jax, jaxlib and scipy left out)"
