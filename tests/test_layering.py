"""The direction of imports that docs/design.md ("layers and the direction of imports") fixes, read off
the source: only the command line imports the trainer, and the run package knows none of the layers above it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bitnet"


def bitnet_imports(path: Path) -> set[str]:
    """Every bitnet module `path` imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "bitnet" or n.startswith("bitnet.")}


def modules(package: str = "") -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def test_only_the_command_line_imports_the_trainer():
    offenders = {str(p.relative_to(SRC)): sorted(n for n in bitnet_imports(p) if n.startswith("bitnet.train"))
                 for p in modules() if p.parts[len(SRC.parts)] not in ("train", "cli")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "bitnet.train.loop" in bitnet_imports(SRC / "cli" / "train.py")  # the scan sees function-level imports


def test_the_run_package_imports_no_layer_above_it():
    above = ("bitnet.train", "bitnet.model", "bitnet.data", "bitnet.instrumentation", "bitnet.export",
             "bitnet.generation", "bitnet.cli", "bitnet.status")
    found = {str(p.relative_to(SRC)): sorted(n for n in bitnet_imports(p) if n.startswith(above))
             for p in modules("run")}
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) >= 5  # layout, jsonl, files, checkpoint, directory (and __init__)
