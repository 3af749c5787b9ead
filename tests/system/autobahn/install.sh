#!/usr/bin/env bash
# Installs Autobahn|Testsuite (wstest) into $1 (default .autobahn), for tests/system/test_autobahn.py.
#
# wstest runs on Python 2.7 only. We look for it as $PYTHON27, then pyenv's 2.7.x, then
# python2.7 on PATH; current virtualenv releases cannot make 2.7 environments, so a small
# bootstrap venv holds virtualenv<20.22. The versions are pinned (requirements-py27.txt) so
# every machine runs the same suite.
set -euo pipefail
dest="${1:-.autobahn}"
here="$(cd "$(dirname "$0")" && pwd)"

py27="${PYTHON27:-}"
if [ -z "$py27" ]; then
    for candidate in "$HOME"/.pyenv/versions/2.7.*/bin/python; do
        if [ -x "$candidate" ]; then py27="$candidate"; fi
    done
fi
if [ -z "$py27" ] && python2.7 -c '' 2>/dev/null; then
    py27="$(python2.7 -c 'import sys; print(sys.executable)')"
fi
if [ -z "$py27" ]; then
    echo "install.sh: no Python 2.7 found (set PYTHON27=/path/to/python2.7); Autobahn not installed" >&2
    exit 1
fi

rm -rf "$dest"
mkdir -p "$dest"
log="$dest/install.log"
if ! {
    python3 -m venv "$dest/boot" &&
        "$dest/boot/bin/pip" install 'virtualenv<20.22' &&
        "$dest/boot/bin/virtualenv" -p "$py27" "$dest/py27" &&
        "$dest/py27/bin/pip" install --disable-pip-version-check -r "$here/requirements-py27.txt"
} >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "install.sh: installing Autobahn|Testsuite failed; the whole log is in $log" >&2
    exit 1
fi
"$dest/py27/bin/wstest" --help >/dev/null
echo "wstest installed in $dest/py27/bin/wstest"
