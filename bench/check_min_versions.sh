#!/usr/bin/env bash
# Lowest supported versions: a fresh venv with every requirement at its floor, then the fast tests.
#
#   bash bench/check_min_versions.sh                   # every package at its floor in requirements.txt
#   bash bench/check_min_versions.sh peft==0.19.0      # the same, with some pins replaced (to try a lower floor)
#
# Each `name>=X` in requirements.txt is installed as `name==X` (upper bounds and comments are ignored);
# packages that are not listed (huggingface_hub, tokenizers ...) resolve to the newest version those pins
# allow, as they would for a user. torch goes in first, alone: here only the CPU wheel of torch 2.13.0 lies
# on the machine (`pip install torch==2.13.0` picks 2.13.0+cpu); any other torch version pulls a multi-GB
# CUDA build from the registry, which is why torch's floor is the version this check can really install.
# Then `ruff check .` and the fast tests: the README's test command without the slow script tests, in one
# process (`-n 0` where pytest-xdist is installed). SLOW=1 runs the slow tests too (about 15 more minutes).
# Not run in CI: it downloads about 1 GB and takes about 5 minutes on 2 cores. The venv lives in a
# temporary folder, removed at the end (KEEP_VENV=1 keeps it and prints its path).
# Results: docs/benchmarks.md, "Lowest supported versions".
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
if [ "${KEEP_VENV:-0}" = 1 ]; then
    trap 'echo "venv kept: $work/venv"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi

# name>=X[,<Y]  # comment   ->   name==X
floors=$(sed -E 's/#.*//; s/[[:space:]]+//g; /^$/d; s/^([A-Za-z0-9_.-]+)>=([^,;]+).*/\1==\2/' requirements.txt)
name_of() { echo "${1%%[=<>!~]*}" | tr 'A-Z_.' 'a-z--'; }
for override in "$@"; do
    floors=$(for pin in $floors; do [ "$(name_of "$pin")" = "$(name_of "$override")" ] || echo "$pin"; done)
    floors="$floors $override"
done
torch_pin=$(for pin in $floors; do if [ "$(name_of "$pin")" = torch ]; then echo "$pin"; fi; done)

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$torch_pin"
# shellcheck disable=SC2086  # one pin per word
python -m pip install --quiet $floors

echo "== pins: $(echo $floors)"
echo "== resolved (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $(python -V 2>&1 | cut -d' ' -f2))"
python -m pip freeze | grep -iE '^(torch|diffusers|transformers|accelerate|datasets|peft|bitsandbytes|tensorboard|safetensors|pillow|numpy|tqdm|nbclient|nbformat|ipykernel|pytest(-xdist|-timeout)?|ruff|huggingface[-_]hub|tokenizers|pyarrow|protobuf)=='

echo "== ruff check ."
ruff_status=0
ruff check . || ruff_status=$?

pytest_args=(-m "not slow")
[ "${SLOW:-0}" = 1 ] && pytest_args=()
python -c "import xdist" 2>/dev/null && pytest_args+=(-n 0)
echo "== tests: pytest ${pytest_args[*]}"
start=$(date +%s)
test_status=0
HF_HUB_OFFLINE=1 python -m pytest "${pytest_args[@]}" -q -p no:cacheprovider --continue-on-collection-errors ||
    test_status=$?
echo "== tests: exit $test_status in $(($(date +%s) - start)) s; ruff: exit $ruff_status"
exit $((test_status || ruff_status))
