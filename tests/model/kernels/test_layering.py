"""The kernels package imports nothing from the model: the model imports it, never the reverse."""

import ast
from pathlib import Path

import bitnet.model.kernels as kernels_package


def test_kernel_files_import_only_torch_triton_and_each_other():
    folder = Path(kernels_package.__file__).parent
    seen = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            seen.setdefault(path.name, set()).update(n for n in names if n.startswith("bitnet"))
    assert {"choice.py", "rmsnorm.py", "swiglu.py", "rope.py", "cross_entropy.py", "references.py"} <= set(
        p.name for p in folder.glob("*.py"))
    outside = {name: sorted(n for n in mods if not n.startswith("bitnet.model.kernels")) for name, mods in seen.items()}
    assert all(not mods for mods in outside.values()), outside
    assert "bitnet.model.kernels.references" in seen["rmsnorm.py"]  # the check sees the imports it should
