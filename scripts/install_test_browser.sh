#!/usr/bin/env bash
# Installs Debian's Chromium for the studio's end-to-end browser test (never a downloaded browser build).
# Without root or apt the browser test is skipped, with a reason, and everything else still runs.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped"
else
  echo "not root or no apt-get: install Debian's 'chromium' package to run the browser test"
fi
exit 0
