#!/usr/bin/env bash
# Debian's chromium, for the test that opens report.html in a real headless browser (no browser
# builds are downloaded at run time). Installs with apt-get when it is missing and we may.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "[setup] chromium is missing and this user cannot install it (apt-get install chromium);" \
             "set MODELTEST_NO_BROWSER=1 to skip the browser test" >&2
        exit 0
    fi
fi
echo "[setup] installing Debian's chromium (for the report's browser test)"
for attempt in 1 2; do     # a mirror hiccup gets one more try
    if $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
    sleep 5
done
echo "[setup] error: apt-get could not install chromium" >&2
exit 1
