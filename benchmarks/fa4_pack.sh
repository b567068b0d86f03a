#!/usr/bin/env bash
# Packs FlashAttention-4 (flash-attn-4, CuTe DSL) and its dependencies for a GPU machine without network,
# as two folders that each fit the device tool's 64 MiB carry limit with the repository beside them:
#   .carry/fa4a/  the CUTLASS DSL compiler library (_cutlass_ir.cu13 .so, 193 MB, xz'd to ~45 MiB)
#   .carry/fa4b/  its runtime library (xz'd, ~12 MiB), the rest of that wheel, and the small wheels (~10 MiB)
# The cu13 library wheel alone is 92 MB (deflate), so the set cannot travel in one call: one call carries
# fa4a, the next (on the same, still warm machine) fa4b; benchmarks/fa4_install.py assembles them.
# Target: CPython 3.12, manylinux x86_64, CUDA 13 driver (the device machine's torch 2.11+cu130).
# Run here (needs pip and xz; about 5 minutes of CPU for the xz): bash benchmarks/fa4_pack.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-.carry}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# FA4 4.0.0b36 needs nvidia-cutlass-dsl>=4.6.2, apache-tvm-ffi<0.2, quack-kernels>=0.5.3, einops and
# torch-c-dlpack-ext; the device image already has torch, cuda-bindings and cuda-pathfinder (torch 2.11's
# dependencies), triton, protobuf, numpy. torch-c-dlpack-ext is left out: its prebuilt addons stop at torch
# 2.9, and torch >= 2.10 has the DLPack exchange API it adds (tvm-ffi then skips it).
WHEELS=(flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1
        nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2
        einops==0.8.2)
mkdir -p "$OUT/fa4a" "$OUT/fa4b/wheels"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT/fa4b/wheels" "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WORK" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$WORK/x"
(cd "$WORK/x" && "$PY" -m zipfile -e "$WORK"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
RT=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
# x86 branch filter + a dictionary as large as the file: 47.5 MB against 92 MB for the wheel's deflate
xz -T1 --x86 --lzma2=preset=9e,dict=192MiB -c "$WORK/x/$IR" >"$OUT/fa4a/cutlass_ir.so.xz"
xz -T1 --x86 --lzma2=preset=9e,dict=64MiB -c "$WORK/x/$RT" >"$OUT/fa4b/cute_dsl_runtime.so.xz"
rm "$WORK/x/$IR" "$WORK/x/$RT"
tar -C "$WORK/x" -cJf "$OUT/fa4b/cu13_rest.tar.xz" .
printf '%s\n' "$IR" >"$OUT/fa4a/cutlass_ir.so.path"
printf '%s\n' "$RT" >"$OUT/fa4b/cute_dsl_runtime.so.path"
du -sh "$OUT/fa4a" "$OUT/fa4b"
