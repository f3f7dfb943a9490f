#!/usr/bin/env bash
# What the web demo and its browser test (tests/test_app.py) need on a fresh machine:
#   * Debian's chromium + chromium-driver (apt-get), unless a chromium and a chromedriver are already on PATH;
#   * the demo's Python requirements (requirements-demo.txt) in .venv (or $PY).
# Idempotent and quiet. Always exits 0: where something cannot be installed it says why, and the browser
# test then skips with that reason.
set -u
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
say() { echo "install_browser: $*"; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    :  # already there
elif ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get on this machine: install Chromium and chromedriver yourself (the browser test skips without them)"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            say "not root and no password-less sudo: cannot apt-get install chromium chromium-driver (the browser test skips)"
        fi
    fi
    if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
        log="$(mktemp)"
        if $SUDO apt-get update -qq >"$log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >>"$log" 2>&1; then
            say "installed $(chromium --version 2>/dev/null | head -1)"
        else
            say "apt-get could not install chromium chromium-driver (the browser test skips):"
            tail -n 5 "$log" | sed 's/^/    /'
        fi
        rm -f "$log"
    fi
fi

stamp=".venv/.demo-installed"
if [ ! -x "$PY" ]; then
    say "no Python environment at $PY (run \`make venv\` first): demo requirements not installed"
elif [ "$PY" = ".venv/bin/python" ] && [ -f "$stamp" ] && [ "$stamp" -nt requirements-demo.txt ]; then
    :  # up to date
elif "$PY" -m pip install -q -r requirements-demo.txt; then
    [ "$PY" = ".venv/bin/python" ] && touch "$stamp"
else
    say "pip could not install requirements-demo.txt (the demo tests skip)"
fi
exit 0
