#!/usr/bin/env bash
# Builds Horovod 0.28.1 (PyTorch + Gloo, no MPI) into $VENV against the torch installed there.
#
# The plain `pip install horovod` fails on these machines for two reasons (see ../shared/DESIGN.md):
# its CMake finds the CUDA toolkit (torch is a CUDA build) and wants a CUDA arch list, and it
# hard-codes C++14 while torch 2.14's headers need C++20. A CMake toolchain file injects a
# project-include file that swaps the C++14 flag for C++20.
set -euo pipefail
VENV=${VENV:?set VENV to the virtual environment}
PY="$VENV/bin/python"
if "$PY" -c "import horovod.torch" 2>/dev/null; then
  echo "horovod already importable in $VENV"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/cxx20.cmake" <<'CMAKE'
set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++20")
set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++20")
CMAKE
cat > "$work/toolchain.cmake" <<CMAKE
set(CMAKE_PROJECT_horovod_INCLUDE "$work/cxx20.cmake")
CMAKE
# The CUDA toolkit root is the folder whose bin/ holds the real nvcc (/usr/local/bin/nvcc here is
# a wrapper script, so resolving it from PATH gives the wrong root).
cuda_root=""
for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ]; then cuda_root=$candidate; break; fi
done
if [ -n "$cuda_root" ]; then
  export CUDA_HOME="$cuda_root" HOROVOD_CUDA_HOME="$cuda_root" HOROVOD_BUILD_CUDA_CC_LIST=90
  export PATH="$cuda_root/bin:$PATH"
fi
export CMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS="-j$(nproc)"
echo "building horovod 0.28.1 into $VENV (takes a few minutes)"
"$PY" -m pip install --quiet --no-build-isolation --no-cache-dir -r "$(dirname "$0")/../training/requirements-horovod.txt"
"$PY" -c "import horovod.torch as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'gloo built:', hvd.gloo_built())"
