#!/usr/bin/env bash
# Build examples/cpp/build/lrp_explain (C++17, CMake). Needs g++, cmake, npm (headers, once) and the
# onnxruntime Python wheel (the library).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/get_onnxruntime.sh" "$here/build/onnxruntime"
cmake -S "$here" -B "$here/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$here/build" -j 2 >/dev/null
echo "$here/build/lrp_explain"
