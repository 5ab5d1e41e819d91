#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser tests (tests/browser/).
# Playwright drives this binary; it never downloads a browser of its own.
set -u
CHROMIUM=${SWITCHYARD_CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
  echo "Chromium: $CHROMIUM"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Chromium: missing; installing Debian's chromium package"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    && [ -x "$CHROMIUM" ] && echo "Chromium: $CHROMIUM" && exit 0
fi
echo "Chromium: not installed at $CHROMIUM. Install it: apt-get install chromium" >&2
exit 1
