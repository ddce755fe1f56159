#!/usr/bin/env bash
# What tests/test_web.py and tests/test_text.py need: Debian's Chromium (apt-get, if missing) and examples/web's pinned npm
# packages (npm ci: onnxruntime-web, puppeteer-core). Nothing else is downloaded: puppeteer-core fetches
# no browser, and PUPPETEER_SKIP_DOWNLOAD / ONNXRUNTIME_NODE_INSTALL keep any package from trying.
#   bash tools/install_browser.sh        (as root, or with sudo available for apt-get)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install_browser.sh: npm is missing (Node.js >= 18 with npm is needed)" >&2
  exit 1
fi
web="$root/examples/web"
installed="$web/node_modules/.package-lock.json"  # written by npm ci; older than the lock file: install again
if [ ! -f "$installed" ] || [ "$web/package-lock.json" -nt "$installed" ] || [ "$web/package.json" -nt "$installed" ]; then
  (cd "$web" && PUPPETEER_SKIP_DOWNLOAD=1 ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "chromium: $(command -v chromium); examples/web: $(cd "$web" && node -e \
  "console.log(['onnxruntime-web','puppeteer-core'].map(p=>p+' '+require('./node_modules/'+p+'/package.json').version).join(', '))")"
