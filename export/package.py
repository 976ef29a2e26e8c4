"""Saver: write a model package folder (manifest with file hashes + model) that ``edge_runtime`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edge_runtime.inference.package import FORMAT_VERSION, MANIFEST_NAME, ModelPackage, sha256_file


def write_package(
    out_dir: Path, model_file: Path, manifest: dict[str, Any], extra_files: list[Path] = ()  # type: ignore[assignment]
) -> ModelPackage:
    """Copy the model (and extras) into ``out_dir``, hash every file into the manifest, then load it back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for src in [model_file, *extra_files]:
        dst = out_dir / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        files[dst.name] = {"sha256": sha256_file(dst)}
    data = {"format": FORMAT_VERSION, **manifest, "files": files}
    data.setdefault("model", {})["file"] = model_file.name
    (out_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return ModelPackage.load(out_dir)


def add_file(package_dir: Path, path: Path) -> None:
    """Add (or refresh) one file's hash in an existing package's manifest."""
    manifest_path = package_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    data["files"][path.name] = {"sha256": sha256_file(path)}
    manifest_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
