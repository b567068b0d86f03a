#!/usr/bin/env bash
# Sourced by run_tests.sh (after bootstrap.sh): the tools the export tests run against (issue 23).
# - lm-eval: wheels only (~40 packages, ~1 min on a fresh machine); BITNET_LM_EVAL=0 skips it.
# - llama-cpp-python: PyPI has only its source, which compiles llama.cpp (~5 min of 2 cores), too slow
#   for every CI run. It is built once into a wheel cache on request (BITNET_LLAMA_CPP=1) and reused
#   by every later run on that machine; without a cached wheel the llama.cpp tests skip and say why.
LLAMA_CPP_VERSION="0.3.36"
WHEELS="${BITNET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/bitnet-train/wheels}"
if [[ "${BITNET_LM_EVAL:-1}" != "0" ]] && ! python -c "import lm_eval" 2>/dev/null; then
  pip install -q "lm-eval==0.4.13"
fi
if ! python -c "import llama_cpp" 2>/dev/null; then
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z "$wheel" && "${BITNET_LLAMA_CPP:-0}" == "1" ]]; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION (compiles llama.cpp, several minutes) into $WHEELS"
    # LLAVA_BUILD=OFF: the multimodal library is a quarter of the build and nothing here uses it.
    CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" pip wheel -q --no-deps -w "$WHEELS" \
      "llama-cpp-python==$LLAMA_CPP_VERSION"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
  fi
  if [[ -n "$wheel" ]]; then
    pip install -q "$wheel"
  else
    echo "llama-cpp-python not installed: the llama.cpp tests will skip (BITNET_LLAMA_CPP=1 builds it once)"
  fi
fi
