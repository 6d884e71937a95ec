#!/usr/bin/env bash
# Chromium for the browser test (tests/test_browser.py drives it with Playwright): Debian's package.
# Never fatal: without a browser that one test is skipped and says why.
set -uo pipefail

for candidate in chromium chromium-browser; do
    if command -v "$candidate" >/dev/null 2>&1; then
        exit 0
    fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser test (about a minute)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
       { apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; then
        exit 0
    fi
fi
echo "[setup] no Chromium (install the 'chromium' package): the browser test will be skipped" >&2
exit 0
