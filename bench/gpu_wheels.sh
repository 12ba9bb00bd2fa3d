#!/usr/bin/env bash
# Download the wheels that the GPU machine's image lacks into .whl/ (ignored by git), for
# bench/gpu_check.py to install there (the machine reaches no package registry).
#
#     bash bench/gpu_wheels.sh        # then pass carry [".whl"] to the device command
#
# The image (Python 3.12, torch 2.11+cu130, transformers, accelerate, peft, safetensors, tokenizers,
# pyarrow, pandas, jinja2, pyyaml, sentencepiece, protobuf, psutil, huggingface-hub, xxhash, fsspec)
# lacks exemplar's pydantic and datasets, TRL (the benchmark), and bitsandbytes (QLoRA); these and
# the needs they pull in that the image does not hold are pinned here, one version each (two
# versions of a package stop the install there). typing-extensions and fsspec are in the image, but
# at versions not read here: pydantic-core needs typing-extensions >= 4.16 and datasets fsspec
# <= 2026.9.0, so both travel too (small); so does peft, pinned to the version the CPU tests use
# (exemplar's LoRA passes `ensure_weight_tying`, which peft has from 0.18 on). Installed with
# --target and put first on the path, they shadow the image's copies for that run only.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  pydantic==2.14.3
  pydantic-core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  fsspec==2026.9.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  peft==0.21.2
  trl==1.16.0
  bitsandbytes==0.50.2
)

rm -rf .whl && mkdir .whl  # nothing left from an earlier list: one version of each
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' .gitignore || grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
for wheel in "${WHEELS[@]}"; do
  # The command from the device tool's README (nvidia-h200 note), one package at a time so a
  # failure names it.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$wheel"
done
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels: $((total / 1024 / 1024)) MiB of the 64 MiB that one device call carries (the tree counts too)"
if (( total > 60 * 1024 * 1024 )); then
  echo "too big to carry with the working tree" >&2
  exit 1
fi
