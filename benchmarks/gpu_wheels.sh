#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (Python 3.12; it has jax, flax, optax, orbax, torch,
# transformers, ...), downloaded here into .whl/ (~6 MB) so they travel with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 tensorboardX==2.6.5
ls .whl
