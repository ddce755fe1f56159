#!/bin/sh
# Chromium for the tests that render the HTML heatmaps in a real browser (tests/test_text.py).
# Debian/Ubuntu: installs the distribution's chromium when no chromium is on PATH; needs root.
set -e
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
command -v chromium
