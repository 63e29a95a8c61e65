#!/usr/bin/env bash
# Run here, from the project root: packs the wheels that the GPU machine lacks into
# .gpusite/site.tar.xz (git-ignored), which bench/device_setup.sh unpacks there. xz keeps it
# small enough to travel beside the world model's weights within a call's 64 MiB.
set -euo pipefail
[ -d .whl ] || ../shared/tools/device-wheels .whl
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --only-binary=:all: .whl/*.whl
mkdir -p .gpusite
grep -qx '/.gpusite/' .git/info/exclude 2>/dev/null || echo '/.gpusite/' >> .git/info/exclude
tar cf - -C "$site" . | xz -T0 -6 > .gpusite/site.tar.xz
du -h .gpusite/site.tar.xz
