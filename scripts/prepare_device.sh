#!/usr/bin/env bash
# Prepares .device/ for scripts/device_check.sh, on a machine that reaches PyPI and has this project
# installed (the GPU machine reaches no registry and lacks these pieces):
#   .device/whl/        wheels of the pure-Python packages missing there (hydra-core, omegaconf and
#                       antlr4 for the config; datasets, dill and multiprocess for the data layer),
#                       for Python 3.12, without dependencies (the rest is installed there)
#   .device/smollm2/    SmolLM2-135M-Instruct's config and tokenizer without weights (a few MB; the
#                       packaged GGUF is 94 MB, over what a call carries): the pipeline trains a
#                       random shrink of it (model=tiny's shape), the benchmark a random model of its
#                       full shape (throughput does not depend on the weights' values)
# .device/ is ignored by git (.gitignore) and carried by name to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
rm -rf "$DEV"
mkdir -p "$DEV/whl"

# The versions this project is tested with here.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d "$DEV/whl" \
    hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# antlr4-python3-runtime 4.9.3 (the version omegaconf pins) exists only as a source archive: build
# its pure-Python wheel here.
python3 -m pip wheel --quiet --no-deps -w "$DEV/whl" antlr4-python3-runtime==4.9.3

python3 scripts/device_check.py --prepare-model "$DEV/smollm2"
ls -l "$DEV/whl" "$DEV/smollm2"
du -sh "$DEV"
