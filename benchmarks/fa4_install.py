"""Installs the FlashAttention-4 set that benchmarks/fa4_pack.sh packed into a site folder, on a machine without
network (the device machine). Prints the PYTHONPATH that makes it importable.

    python3 benchmarks/fa4_install.py --carry .carry --site /tmp/fa4site     # on the GPU machine

The set comes as two parts (.carry/fa4a, .carry/fa4b) that travel in separate calls, since together they pass
the 64 MiB carry limit; whichever part is present is unpacked into the site folder, which stays on a warm
machine, so the call carrying fa4b completes what an earlier call (fa4a) began. Wheels are unzipped, not
pip-installed: they are plain purelib/platlib wheels (no .data, no scripts), and unzipping merges the three
wheels that share the nvidia_cutlass_dsl folder (pip --target --upgrade would replace it wholesale). The
packages' one .pth file (it puts nvidia_cutlass_dsl/dsl_packages on sys.path) only runs from a site dir,
hence `site_paths` and the printed PYTHONPATH.
"""

import argparse
import json
import lzma
import shutil
import sys
import tarfile
import time
import zipfile
from pathlib import Path

# Files whose presence means the set is complete (relative to the site folder).
REQUIRED = ("flash_attn/cute/interface.py", "quack/__init__.py", "tvm_ffi/__init__.py",
            "nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py")
PARTS = ("fa4a", "fa4b")


def site_paths(site: Path) -> list[str]:
    """What goes on sys.path / PYTHONPATH for the installed set (the site and the .pth file's folder)."""
    return [str(site), str(site / "nvidia_cutlass_dsl" / "dsl_packages")]


def _unxz(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with lzma.open(src) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 16 << 20)
    tmp.replace(dest)  # whole file or none: a call cut short leaves no truncated library behind


def _unpack_part(part: Path, site: Path) -> list[str]:
    """Unpack one carried part (wheels, *.xz with a .path file naming the destination, *.tar.xz); returns what."""
    done = []
    for whl in sorted(part.glob("wheels/*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        done.append(whl.name)
    for xz in sorted(part.glob("*.so.xz")):
        rel = (part / xz.name.replace(".xz", ".path")).read_text().strip()
        _unxz(xz, site / rel)
        done.append(rel)
    for tar in sorted(part.glob("*.tar.xz")):
        with tarfile.open(tar) as t:
            t.extractall(site, filter="data")
        done.append(tar.name)
    return done


def missing(site: Path) -> list[str]:
    """Required files not in the site folder, with the two big libraries found by their .path files' names."""
    need = list(REQUIRED) + ["(fa4a) _cutlass_ir.cu*.so", "(fa4b) libcute_dsl_runtime.so"]
    have_ir = any(site.glob("nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu*.so"))
    have_rt = any(site.glob("nvidia_cutlass_dsl/cu*/lib/libcute_dsl_runtime.so"))
    return [n for n in need if not (
        (site / n).exists() or (n.startswith("(fa4a)") and have_ir) or (n.startswith("(fa4b)") and have_rt))]


def install(carry: Path, site: Path) -> dict:
    """Unpack the parts present under `carry` into `site` (parts already unpacked are done again only if
    carried again); returns {"seconds", "unpacked", "missing", "complete", "site_paths"}."""
    start = time.perf_counter()
    site.mkdir(parents=True, exist_ok=True)
    unpacked = []
    for name in PARTS:
        part = carry / name
        if part.is_dir():
            unpacked += _unpack_part(part, site)
    left = missing(site)
    return {"seconds": round(time.perf_counter() - start, 2), "unpacked": unpacked, "missing": left,
            "complete": not left, "site_paths": site_paths(site)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--carry", default=".carry", help="folder holding fa4a/ and/or fa4b/ (benchmarks/fa4_pack.sh)")
    p.add_argument("--site", default="/tmp/fa4site", help="where to unpack (kept while the machine is warm)")
    a = p.parse_args()
    report = install(Path(a.carry), Path(a.site))
    print(json.dumps(report, indent=1))
    if report["complete"]:
        print("export PYTHONPATH=" + ":".join(report["site_paths"]) + ":$PYTHONPATH")
    else:
        print("incomplete: missing " + ", ".join(report["missing"]), file=sys.stderr)


if __name__ == "__main__":
    main()
