#!/usr/bin/env bash
# Make sure Debian's chromium is at /usr/bin/chromium for the review page's browser test
# (tests/test_review_page.py drives it with Playwright's executable_path; Playwright's own browser
# download is never used). Installs it with apt-get when it is missing and we are root; otherwise says
# so and succeeds, and the browser test skips with the reason.
set -uo pipefail

CHROMIUM=${PBRF_TEST_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and apt-get as root is not available;" \
         "the browser test (tests/test_review_page.py) will skip" >&2
    exit 0
fi
echo "ensure-chromium: installing Debian's chromium with apt-get (a few minutes)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "ensure-chromium: apt-get could not install chromium; the browser test will skip" >&2
fi
exit 0
