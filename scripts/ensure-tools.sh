#!/usr/bin/env bash
# Tools for the test suite, from Debian's packages, installed when missing and apt-get is usable
# (as root):
#   docker-compose (1.29)  validates docker-compose.yml offline (tests/test_compose.py);
#   chromium               the browser tests/test_web_browser.py drives through Playwright's
#                          Python package (executable_path=/usr/bin/chromium; no browser is
#                          downloaded).
# A test whose tool could not be installed skips and says why.
set -uo pipefail
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} (Debian packages) for the test suite"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    || echo "could not install ${missing[*]}; the tests that need them will skip"
fi
exit 0
