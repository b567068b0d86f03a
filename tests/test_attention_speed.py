"""benchmarks/attention_speed.py's CPU plumbing, and benchmarks/fa4_install.py assembling the two carried parts."""

import importlib.util
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _installer():
    spec = importlib.util.spec_from_file_location("fa4_install", BENCH / "fa4_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IR = "nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so"
RT = "nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so"


def _fake_carry(root: Path) -> None:
    """The layout benchmarks/fa4_pack.sh writes, with stand-in contents: fa4a the compiler library, fa4b the
    runtime library, the rest of its wheel as a tarball, and wheels (two sharing the nvidia_cutlass_dsl folder)."""
    a, b = root / "fa4a", root / "fa4b"
    (b / "wheels").mkdir(parents=True)
    a.mkdir()
    (a / "cutlass_ir.so.xz").write_bytes(lzma.compress(b"IR" * 1000, preset=1))
    (a / "cutlass_ir.so.path").write_text(IR + "\n")
    (b / "cute_dsl_runtime.so.xz").write_bytes(lzma.compress(b"RT" * 1000, preset=1))
    (b / "cute_dsl_runtime.so.path").write_text(RT + "\n")
    wheels = {"flash_attn_4-0-py3-none-any.whl": {"flash_attn/cute/interface.py": "x = 1\n"},
              "quack-0-py3-none-any.whl": {"quack/__init__.py": ""},
              "tvm_ffi-0-py3-none-any.whl": {"tvm_ffi/__init__.py": ""},
              "dsl_base-0-py3-none-any.whl": {"nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py": "",
                                              "nvidia_cutlass_dsl_packages.pth": "import sys\n"},
              "dsl_core-0-py3-none-any.whl": {"nvidia_cutlass_dsl/dsl_packages/cutlass/core.py": "y = 2\n"}}
    for name, files in wheels.items():
        with zipfile.ZipFile(b / "wheels" / name, "w") as z:
            for path, text in files.items():
                z.writestr(path, text)
    rest = root / "rest"
    (rest / "nvidia_cutlass_dsl/cu13/include").mkdir(parents=True)
    (rest / "nvidia_cutlass_dsl/cu13/include/CuteDSLRuntime.h").write_text("// header\n")
    with tarfile.open(b / "cu13_rest.tar.xz", "w:xz") as t:
        t.add(rest / "nvidia_cutlass_dsl", arcname="nvidia_cutlass_dsl")


def test_install_assembles_the_two_parts_whichever_call_brings_each(tmp_path):
    fa4 = _installer()
    carry, site = tmp_path / "carry", tmp_path / "site"
    _fake_carry(carry)
    first = tmp_path / "first"  # the first call carries fa4b alone
    first.mkdir()
    (carry / "fa4b").rename(first / "fa4b")
    report = fa4.install(first, site)
    assert report["complete"] is False and report["missing"] == ["(fa4a) _cutlass_ir.cu*.so"]
    assert (site / RT).read_bytes() == b"RT" * 1000
    assert (site / "nvidia_cutlass_dsl/dsl_packages/cutlass/core.py").read_text() == "y = 2\n"  # wheels merged
    assert (site / "nvidia_cutlass_dsl/dsl_packages/cutlass/__init__.py").exists()
    assert (site / "nvidia_cutlass_dsl/cu13/include/CuteDSLRuntime.h").exists()
    report = fa4.install(carry, site)  # the next call carries fa4a; fa4b's files are still in the site
    assert report["complete"] is True and report["missing"] == []
    assert report["unpacked"] == [IR]
    assert (site / IR).read_bytes() == b"IR" * 1000
    assert not list(site.rglob("*.part"))
    assert report["site_paths"] == [str(site), str(site / "nvidia_cutlass_dsl" / "dsl_packages")]


def test_install_of_nothing_lists_everything_missing(tmp_path):
    report = _installer().install(tmp_path / "no_carry", tmp_path / "site")
    assert report["complete"] is False and len(report["missing"]) == 6
    assert report["unpacked"] == []


def test_smoke_runs_every_cpu_row_and_writes_the_table_and_json(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(BENCH / "attention_speed.py"), "--smoke", "--out", str(out),
                           "--site", str(tmp_path / "no_site")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["shape"] == {"B": 2, "T": 16, "H": 4, "Hkv": 2, "D": 8, "dtype": "float32"}
    assert result["base"] == "sdpa-math"
    rows = {r["impl"]: r for r in result["rows"]}
    assert list(rows) == ["sdpa-math", "sdpa (model default)", "fa4 (bitnet custom op)"]
    for name in ("sdpa-math", "sdpa (model default)"):
        r = rows[name]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_TFLOPs"] >= 0
        assert max(r["err_vs_fp32"].values()) < 1e-5
    assert max(rows["sdpa (model default)"]["diff_vs_base"].values()) < 1e-5
    assert rows["sdpa-math"]["speedup_fwd_bwd_vs_base"] == 1.0
    assert rows["fa4 (bitnet custom op)"]["skipped"] == "FA4 not importable"
    assert "fa4_install" not in result  # no carry given and no site folder: nothing installed
    table = proc.stdout.splitlines()
    assert table[-4].startswith("impl") and table[-1].startswith("fa4 (bitnet custom op)   FA4 not importable")
