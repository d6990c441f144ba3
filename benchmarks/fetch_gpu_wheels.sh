#!/usr/bin/env bash
# Downloads, on a machine that reaches a package registry, the wheels that `gpu_check.sh` installs on the lent
# GPU machine (CPython 3.12, no registry, no zarr): zarr 3.4 and what it imports beyond torch's and
# transformers' dependencies, into .whl/ (git-ignored). Pass .whl with the device tool's carry, then run
# `bash benchmarks/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "zarr==3.4.2" "numcodecs==0.17.1" donfig google-crc32c crc32c msgspec typing_extensions packaging
ls .whl
