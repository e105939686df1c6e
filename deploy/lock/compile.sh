#!/usr/bin/env bash
# Regenerate deploy/constraints.txt, the exact versions both images install
# (CPython 3.12, every platform). Needs uv; run from anywhere:  deploy/lock/compile.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${UV:-uv}" pip compile pyproject.toml deploy/lock/torch-cpu-deps.in \
  --extra worker \
  --override deploy/lock/overrides.txt \
  --no-emit-package torch \
  --universal \
  --python-version 3.12 \
  --custom-compile-command "deploy/lock/compile.sh" \
  --output-file deploy/constraints.txt \
  "$@"
