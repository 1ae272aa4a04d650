#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the constraints every install uses (README, .ci/run, Dockerfiles):
#   bash scripts/lock.sh
# pyproject.toml's requirements (the serving install, the cpu, train, tracing and test extras) are resolved with the
# newest releases that fit them, in a fresh virtual environment, and frozen; the gpu extra cannot share a venv with
# the cpu one (both own the onnxruntime module), so its two packages are resolved on their own and checked against
# the rest. Then run the tests against the new lock (`.ci/run`) before committing it: the lock is what passed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=requirements/lock.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q -e '.[cpu,test]'
# The gpu extra's own pins: the newest releases within pyproject's ranges, dependencies left to the check below.
mapfile -t gpu < <("$py" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu']))")
"$py" -m pip install -q --dry-run --ignore-installed --no-deps --report "$tmp/gpu.json" "${gpu[@]}"
{
  echo "# Constraints for every install of c2p-serve: pip install -c requirements/lock.txt -e '.[cpu]' (or '.[cpu,test]',"
  echo "# '.[gpu]'). Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$py" --version) on $(uname -sm); tests/test_lock.py"
  echo "# checks it against pyproject.toml. Local version labels are dropped (torch==2.13.0 also matches 2.13.0+cpu)."
  {
    "$py" -m pip freeze --all --exclude-editable | grep -v "^pip=="
    "$py" -c "import json, sys; [print(f\"{i['metadata']['name']}=={i['metadata']['version']}\") for i in json.load(open(sys.argv[1]))['install']]" "$tmp/gpu.json"
  } | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f -u
} > "$tmp/lock.txt"
# The gpu install must resolve inside the lock, with no onnxruntime beside onnxruntime-gpu.
"$py" -m pip install -q --dry-run --ignore-installed --report "$tmp/gpu-full.json" -c "$tmp/lock.txt" -e '.[gpu]'
"$py" -c "import json, sys; names = {i['metadata']['name'].lower() for i in json.load(open(sys.argv[1]))['install']}; \
assert 'onnxruntime' not in names and 'onnxruntime-gpu' in names, sorted(names)" "$tmp/gpu-full.json"
mv "$tmp/lock.txt" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") pins)"
