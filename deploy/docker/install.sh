#!/bin/sh
# Build steps shared by the Dockerfile's cpu and gpu targets; run inside an image build, not on a host.
#
#   install.sh deps EXTRA   a venv at /opt/clipserve holding the project's dependencies plus one extra (cpu or
#                           gpu), read from pyproject.toml alone, so this layer survives code-only changes
#   install.sh app          the project itself, without dependencies, into /install; the final stage copies it
#                           over the venv, so a code change rebuilds a small layer instead of the whole venv
set -eu
VENV=/opt/clipserve

case "${1:-}" in
deps)
    extra="${2:?usage: install.sh deps cpu|gpu}"
    python3 -m venv "$VENV"
    # tomllib is in the standard library from Python 3.11, which both bases have.
    "$VENV/bin/python" - "$extra" > /tmp/requirements.txt <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"][sys.argv[1]]))
PY
    "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt "setuptools>=77"
    rm /tmp/requirements.txt
    ;;
app)
    "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --prefix /install .
    # The demo model's repository is copied to /models by the Dockerfile, and its training weights are only
    # for the torch path; neither belongs in site-packages of a serving image.
    rm -rf /install/lib/python3*/site-packages/models/demo/repository \
        /install/lib/python3*/site-packages/models/demo/artifacts
    ;;
*)
    echo "usage: install.sh deps cpu|gpu | install.sh app" >&2
    exit 2
    ;;
esac
