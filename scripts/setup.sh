#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv at the repo root. Idempotent: a second run with an
# unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# one setup at a time (the README's two commands started at once in two terminals): a second pip running while the
# first one made .venv found no pyvenv.cfg yet, so .venv/bin/python was the base interpreter and pip installed there
if command -v flock >/dev/null 2>&1; then
    exec 9<scripts/setup.sh
    flock 9
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    echo "setup.sh: .venv/bin/python is not a virtual environment's (no .venv/pyvenv.cfg?): remove .venv and run" \
        "this again; nothing was installed" >&2
    exit 1
fi
stamp=.venv/.sequencer-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import sequencer" 2>/dev/null; then
    exit 0
fi
echo "setting up .venv (first run installs torch; this takes a few minutes)" >&2
pip_install() {
    # this environment's pip config names index folders that may not exist; pip warns once per package about them
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
# torch/torchvision first, pinned to the builds that install from this machine's local wheel cache.
pip_install "torch==2.14.1" "torchvision==0.29.1"
# Up to 0.1.0 this project installed as the distribution "sequencer", a name that belongs to an unrelated PyPI
# project which also ships a `sequencer` module. Either would shadow ours in this venv: remove it first.
if .venv/bin/python -m pip show -q sequencer >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y sequencer
fi
rm -rf src/sequencer.egg-info  # the old name's build metadata, found on sys.path through the editable src/
pip_install -e ".[test]"
echo "$want" > "$stamp"
