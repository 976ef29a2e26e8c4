"""edge_runtime runs on devices without torch: every module imports with torch made unimportable."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edge_runtime


def test_every_edge_runtime_module_imports_without_torch() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime."))
    assert "edge_runtime.service" in modules and "edge_runtime.inference.runner.onnxruntime" in modules
    script = (
        "import sys, importlib\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    if name.endswith('__main__'): continue\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok', len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_export_needs_torch_and_says_which_extra() -> None:
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from export.cli import main\n"
        "raise SystemExit(main(['default-model', '--out', '/nonexistent/pkg']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "edge-runtime[export]" in out.stderr
