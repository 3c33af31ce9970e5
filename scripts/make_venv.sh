#!/bin/sh
# Create the virtual environment from the pinned requirements and mark it done.
# The marker is written last, so an interrupted install is redone next time.
set -eu
venv=$1
requirements=$2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
touch "$venv/.installed"
