#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.sh installs on a GPU machine that has torch but no internet.
#
#   bash tools/fetch_gpu_wheels.sh [DEST]          # DEST defaults to .whl (ignored by git)
#
# One `pip download` resolves nbdev and the test tools with all their dependencies together, so DEST holds
# exactly one version of each. The wheels are for CPython $GPU_PYTHON_VERSION (default 3.12, the GPU machine's)
# on manylinux x86-64; most are pure Python. torch is not fetched: the GPU machine has its own CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pyver=${GPU_PYTHON_VERSION:-3.12}
python=${PYTHON:-python3}

# Versions as settings.ini's dev_requirements pins them (jupyterlab is not needed to run tests; matplotlib and tqdm are: the visualisation chapter draws, the demo shows progress),
# and setuptools and wheel to build the package offline.
requirements=(nbdev==2.4.14 'execnb<0.2' 'fastcore<2' 'ghapi<2' matplotlib tqdm pytest hypothesis setuptools wheel)

platforms=()
for p in manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64 \
         manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$p")
done

mkdir -p "$dest"
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$dest" "${requirements[@]}"

# Two versions of one package would stop the offline install: refuse them here, where they can be fixed.
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-.' 'a-z__' | sort | uniq -d)
if [ -n "$dupes" ]; then echo "more than one version of: $dupes (empty $dest and fetch again)" >&2; exit 1; fi
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $dest for CPython $pyver"
