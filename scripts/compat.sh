#!/usr/bin/env bash
# Compatibility runs outside the lock (README, "Compatibility"): a fresh venv per run, then the default tests
# (the invariants at the logit level among them; pytest prints the worst logit difference of each check).
#
#   scripts/compat.sh newest    the newest releases pyproject allows (no constraints file): catches drift
#                               inside the declared ranges, e.g. a new patch release
#   scripts/compat.sh oldest    the lowest transformers pyproject claims (and the huggingface-hub it takes),
#                               everything else as locked
#   scripts/compat.sh beyond    the newest releases with pyproject's upper bounds lifted: what the next
#                               release would break, before the bounds are raised
#
# Each run installs into .venv-<mode> (a few minutes; pip's cache makes later runs fast) and prints the
# versions it resolved. Extra arguments go to pytest (e.g. -x, -k cached).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/compat.sh newest|oldest|beyond [pytest args]}
shift
venv=".venv-$mode"
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/pip" install -q)
case "$mode" in
newest)
    "${pip[@]}" -e '.[test]'
    ;;
oldest)
    floor=$(python3 -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r">=([\w.]+)", d).group(1) for d in deps if d.startswith("transformers")))')
    # transformers' floor and the huggingface-hub it accepts (5.17 needs huggingface-hub < 2) move together
    grep -v -i -E '^(transformers|huggingface-hub)==' constraints.txt >"$venv/constraints-oldest.txt"
    "${pip[@]}" -c "$venv/constraints-oldest.txt" -e '.[test]' "transformers==$floor"
    ;;
beyond)
    python3 - >"$venv/requirements-beyond.txt" <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deps = project["dependencies"] + [d for name in ("train", "video", "eval") for d in extras[name]] + ["pytest"]
for dep in deps:  # "transformers>=5.17,<5.25" -> "transformers>=5.17"
    print(",".join(part for part in dep.split(",") if "<" not in part) or re.match(r"[\w.-]+", dep).group(0))
EOF
    "${pip[@]}" -r "$venv/requirements-beyond.txt"
    "${pip[@]}" --no-deps -e .
    ;;
*)
    echo "unknown mode $mode (newest, oldest or beyond)" >&2
    exit 2
    ;;
esac
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
names = ["torch", "transformers", "tokenizers", "huggingface_hub", "accelerate", "datasets", "deepspeed", "lmms_eval", "filelock"]
print("resolved: " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
"$venv/bin/python" -m pytest -q "$@"
