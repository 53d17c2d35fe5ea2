#!/usr/bin/env bash
# The wheels an offline GPU machine lacks for bench/gpu_check.py and persona-train, fetched here where PyPI answers.
# The machine's image: Python 3.12 on x86_64 with torch, transformers, accelerate, peft, pyarrow, pandas, xxhash and
# huggingface_hub, but no datasets, evaluate or deepspeed. Writes bench/wheels/ (git-ignored; ~53 MiB, at most 60).
#
#   bash bench/gpu_wheels.sh                # PYTHON=... picks the interpreter that runs pip (default python3)
#   bash bench/gpu_wheels.sh --no-pyarrow   # without pyarrow (6 MiB): for an image whose pyarrow is >= 24
#
# Then, on the machine, in the checkout with bench/wheels/ beside it (the README's "GPU check" gives the line):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/wheels/*.whl
#   PYTHONPATH=/tmp/site python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
# Installed with --no-deps: `pip install --target` ignores what the image holds and would want all of it again (torch
# too). So this list is every package the image lacks, at the versions this checkout is tested with, and each pinned
# dependency at the version its dependant pins (datasets: fsspec <= 2026.9.0, dill < 0.4.2; pydantic: its core;
# pydantic 2.14: typing-extensions >= 4.16). No requirement of setup.cfg is above the image's versions (transformers
# 5.17 >= 5.0, accelerate 1.15 >= 1.4, huggingface_hub 1.33 >= datasets' 1.31).
PACKAGES=(
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
    evaluate==0.4.6
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
)
# The image's pyarrow version is unknown here and datasets 5.2 needs >= 24: carried unless told otherwise (a second
# trip to the machine costs more than the bytes), at 24, the smallest such wheel.
if [[ "${1:-}" != "--no-pyarrow" ]]; then
    PACKAGES+=(pyarrow==24.0.0)
fi
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$WHEELS" "${PACKAGES[@]}"
# DeepSpeed publishes only a source archive; without its compiled ops (DS_BUILD_OPS=0) the wheel is pure Python and
# runs anywhere (ops compile on first use; ZeRO-2 with the Trainer's AdamW needs none). Its build imports torch, so
# it builds in this environment (--no-build-isolation).
if ! DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8; then
    echo "deepspeed did not build: gpu_check.py will record its ZeRO-2 part as skipped" >&2
fi
# The project itself (its modules and console scripts; gpu_check.py runs from the checkout either way).
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .

ls -l "$WHEELS"
size=$(du -sk "$WHEELS" | cut -f1)
echo "$WHEELS: $((size / 1024)) MiB ($size KiB)"
if ((size > LIMIT_MIB * 1024)); then
    echo "more than $LIMIT_MIB MiB: the device call carries at most 64 MiB with the working tree" >&2
    exit 1
fi
