#!/usr/bin/env bash
# Put onnxruntime's C/C++ headers and shared library in DEST (default: examples/cpp/build/onnxruntime):
#   DEST/include  headers (API 29 = onnxruntime 1.29) from the npm package com.github.asus4.onnxruntime,
#                 found inside its Android archive; cached in ~/.cache/lrp-onnx so it is fetched once
#   DEST/lib      links to the library of the installed onnxruntime Python wheel (>= 1.29)
# No registry has an official onnxruntime C++ SDK; the wheel has the library but no headers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/build/onnxruntime}
python=${PYTHON:-python3}
package=com.github.asus4.onnxruntime@0.4.9
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lrp-onnx/onnxruntime-headers-${package##*@}

if [ ! -f "$cache/onnxruntime_cxx_api.h" ]; then
  command -v npm >/dev/null || { echo "get_onnxruntime.sh: npm is needed to fetch the headers" >&2; exit 2; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching onnxruntime headers ($package, ~150 MB) ..." >&2
  npm pack --silent --pack-destination "$tmp" "$package" >/dev/null
  "$python" - "$tmp"/*.tgz "$tmp/headers" <<'PY'
import io, os, sys, tarfile, zipfile
tgz, out = sys.argv[1:3]
os.makedirs(out)
with tarfile.open(tgz) as tar:
    aar = tar.extractfile("package/Plugins/Android/onnxruntime.aar").read()
    licence = tar.extractfile("package/LICENSE").read()
with zipfile.ZipFile(io.BytesIO(aar)) as z:
    for name in z.namelist():
        if name.startswith("headers/") and not name.endswith("/"):
            with open(os.path.join(out, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
with open(os.path.join(out, "LICENSE"), "wb") as f:
    f.write(licence)
PY
  mkdir -p "$(dirname "$cache")"
  rm -rf "$cache" && mv "$tmp/headers" "$cache"
fi
mkdir -p "$dest/include" "$dest/lib"
cp "$cache"/* "$dest/include/"

capi=$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')
version=$("$python" -c 'import onnxruntime; print(onnxruntime.__version__)')
if ! "$python" -c 'import onnxruntime as o, sys; sys.exit(tuple(map(int, o.__version__.split(".")[:2])) < (1, 29))'; then
  echo "get_onnxruntime.sh: onnxruntime $version is older than 1.29 (the headers' API version)" >&2; exit 2
fi
library=$(ls "$capi"/libonnxruntime.so.1.* | head -n 1)
for f in "$capi"/libonnxruntime*.so*; do ln -sf "$f" "$dest/lib/"; done  # providers sit beside the library
ln -sf "$library" "$dest/lib/libonnxruntime.so.1"
echo "onnxruntime $version: $dest" >&2
