"""Model packages: a folder with ``manifest.json`` and an ONNX model, validated once at start.

The manifest carries everything a runtime needs and nothing it must guess. Its shape (format 1)::

    {
      "format": 1,
      "name": "phantom-ct", "version": "1.0.0", "description": "...",
      "files": {"model.onnx": {"sha256": "..."}},
      "model": {"file": "model.onnx", "input": "image", "output": "logits",
                "input_channels": 1, "activation": "softmax"},
      "series_filter": {"modalities": ["CT"]},
      "preprocessing": {"target_spacing": [z, y, x] | null,
                        "normalization": {"kind": "ct_window", "lower": -1024, "upper": 1024,
                                          "mean": 0, "std": 1024}},
      "inference": {"patch_size": [z, y, x], "overlap": 0.5, "blending": "gaussian", "batch_size": 2},
      "labels": [{"value": 1, "name": "Lung",
                  "category": {"value": "91772007", "scheme": "SCT", "meaning": "Organ"},
                  "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
                  "color": [128, 174, 128]}],   # optional codes per label: "type_modifier" (SCT 7771000
                                                # "Left" for a left kidney), "anatomic_region" and
                                                # "anatomic_region_modifier" (a left kidney's cyst)
      "algorithm": {"name": "...", "version": "...", "family": "artificial-intelligence"}
    }

Axes are (slice, row, column) = (z, y, x) everywhere in this package; spacings are in millimetres.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import PackageError
from edge_runtime.inference.channels import Channels, parse_channels
from edge_runtime.inference.confidence import ConfidencePolicy, parse_confidence
from edge_runtime.inference.domain import Domain, parse_domain
from edge_runtime.inference.nnunet.settings import NnunetSettings, parse_nnunet
from edge_runtime.inference.totalsegmentator.settings import TotalSegmentatorSettings, parse_totalsegmentator
from edge_runtime.quality.drift import DriftReference, parse_drift_reference

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
NORMALIZATION_KINDS = ("ct_window", "zscore", "none")
BLENDING_KINDS = ("gaussian", "constant")
ACTIVATIONS = ("softmax",)
#: a label's codes beyond its category and type, each optional (:class:`Label`)
OPTIONAL_LABEL_CODES = ("type_modifier", "anatomic_region", "anatomic_region_modifier")

DEFAULT_PACKAGE = Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass(frozen=True)
class Code:
    """A coded concept (SNOMED CT for segment categories and types)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Label:
    """One segment of the model's output, coded as DICOM's Segment Description Macro codes it (PS3.3 Table 10-25).

    A paired structure is one type with a laterality modifier (TotalSegmentator's kidney_left: Kidney + Left),
    not a type of its own, so that a reader can find every kidney; a finding inside an organ (a kidney cyst) is a
    type in an anatomic region, the region carrying the laterality.
    """

    value: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]
    #: Segmented Property Type Modifier (laterality, mostly); None: the type alone
    type_modifier: Code | None = None
    #: the Anatomic Region the segment lies in, and that region's modifier; None: not stated
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation applied before the model.

    ``ct_window``: clip to [lower, upper], then (x - mean) / std (nnU-Net's CT scheme).
    ``zscore``: per-volume (x - mean(x)) / std(x).
    ``none``: the values as they are.
    """

    kind: str
    lower: float = -math.inf
    upper: float = math.inf
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class ModelPackage:
    root: Path
    name: str
    version: str
    description: str
    model_path: Path
    model_sha256: str
    input_name: str
    output_name: str
    input_channels: int
    activation: str
    modalities: tuple[str, ...]
    target_spacing: tuple[float | None, float | None, float | None] | None
    normalization: Normalization
    patch_size: tuple[int, int, int]
    overlap: float
    blending: str
    batch_size: int
    labels: tuple[Label, ...]
    algorithm_name: str
    algorithm_version: str
    manifest: dict[str, Any] = field(repr=False, compare=False)
    #: the domain the model was validated on (manifest "domain"); None: not declared, every series passes
    domain: Domain | None = field(default=None, compare=False)
    confidence: ConfidencePolicy = field(default=ConfidencePolicy(), compare=False)
    #: what the inputs and outputs looked like at export (manifest "drift_reference"); None: drift not watched
    drift_reference: DriftReference | None = field(default=None, compare=False)
    #: nnU-Net's predictor pipeline (manifest "nnunet"); None: the generic pipeline
    nnunet: NnunetSettings | None = field(default=None, compare=False)
    #: TotalSegmentator's parts around that pipeline (manifest "totalsegmentator"); None: one model
    totalsegmentator: TotalSegmentatorSettings | None = field(default=None, compare=False)
    #: which series of a study gives each input channel (manifest "channels"); None: one series in, as always
    channels: Channels | None = field(default=None, compare=False)
    #: an nnU-Net cascade stage's previous stage, a package inside this one (manifest "nnunet.previous_stage")
    previous_stage: ModelPackage | None = field(default=None, compare=False)

    @property
    def num_classes(self) -> int:
        """Output channels of the model: background plus one per label (a multi-part TotalSegmentator model: each
        part's classes, background included)."""
        if self.totalsegmentator is not None:
            return self.totalsegmentator.output_channels
        if self.nnunet is not None and self.nnunet.regions:  # a region-based nnU-Net model: one sigmoid per region
            return len(self.nnunet.regions)
        return len(self.labels) + 1

    @property
    def image_channels(self) -> int:
        """The model's input channels that come from images (series); a cascade stage's others are the one-hot
        label map of its previous stage."""
        stage = self.nnunet.previous_stage if self.nnunet is not None else None
        return self.input_channels - (len(stage.one_hot_labels) if stage is not None else 0)

    @property
    def identity(self) -> str:
        return f"{self.name} {self.version}"

    @classmethod
    def load(cls, root: Path | str, *, verify_hashes: bool = True) -> ModelPackage:
        """Read and validate a package; every problem found is reported at once."""
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not root.is_dir():
            raise PackageError(root, [f"{root} is not a directory"])
        if not manifest_path.is_file():
            raise PackageError(root, [f"no {MANIFEST_NAME} in {root}"])
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(root, [f"{MANIFEST_NAME} cannot be read as JSON: {exc}"]) from exc
        if not isinstance(manifest, dict):
            raise PackageError(root, [f"{MANIFEST_NAME} must hold a JSON object"])
        return _Parser(root, manifest, verify_hashes).parse()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _Parser:
    """Collects every problem in a manifest before raising, so a user fixes them in one go."""

    def __init__(self, root: Path, manifest: dict[str, Any], verify_hashes: bool):
        self.root = root
        self.m = manifest
        self.verify_hashes = verify_hashes
        self.problems: list[str] = []

    def get(self, path: str, kind: type | tuple[type, ...], default: Any = ..., *, where: Any = None) -> Any:
        node: Any = self.m if where is None else where
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is ...:
                    self.problems.append(f"'{path}' is required")
                return None if default is ... else default
            node = node[part]
        if not isinstance(node, kind) or (isinstance(node, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(f"'{path}' must be {names}, got {type(node).__name__} {node!r}")
            return None if default is ... else default
        return node

    def parse(self) -> ModelPackage:
        fmt = self.get("format", int)
        if fmt is not None and fmt != FORMAT_VERSION:
            self.problems.append(f"'format' is {fmt}; this runtime reads format {FORMAT_VERSION}")
        name = self.get("name", str)
        version = self.get("version", str)
        description = self.get("description", str, "")
        model_file = self.get("model.file", str)
        input_name = self.get("model.input", str)
        output_name = self.get("model.output", str)
        channels = self.get("model.input_channels", int, 1)
        activation = self.get("model.activation", str, "softmax")
        if activation not in ACTIVATIONS:
            self.problems.append(f"'model.activation' is {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        modalities = self.get("series_filter.modalities", list, ["CT"])
        if not all(isinstance(m, str) for m in modalities):
            self.problems.append(f"'series_filter.modalities' must be a list of strings, got {modalities!r}")

        target = self.get("preprocessing.target_spacing", (list, type(None)), None)
        target_spacing: tuple[float | None, float | None, float | None] | None = None
        if target is not None:
            if len(target) != 3 or not all(v is None or (_is_number(v) and v > 0) for v in target):
                self.problems.append(
                    f"'preprocessing.target_spacing' must be 3 positive numbers (or null per axis), got {target!r}"
                )
            else:
                z, y, x = (None if v is None else float(v) for v in target)
                target_spacing = (z, y, x)

        norm = self._normalization()
        patch = self.get("inference.patch_size", list)
        if patch is not None and (len(patch) != 3 or not all(isinstance(v, int) and v > 0 for v in patch)):
            self.problems.append(f"'inference.patch_size' must be 3 positive integers, got {patch!r}")
            patch = None
        overlap = self.get("inference.overlap", (int, float), 0.5)
        if not 0 <= overlap < 1:
            self.problems.append(f"'inference.overlap' must be in [0, 1), got {overlap!r}")
        blending = self.get("inference.blending", str, "gaussian")
        if blending not in BLENDING_KINDS:
            self.problems.append(f"'inference.blending' is {blending!r}; allowed: {', '.join(BLENDING_KINDS)}")
        batch = self.get("inference.batch_size", int, 1)
        if batch < 1:
            self.problems.append(f"'inference.batch_size' must be >= 1, got {batch}")

        labels = self._labels()
        algorithm_name = self.get("algorithm.name", str, name or "")
        algorithm_version = self.get("algorithm.version", str, version or "")

        model_path = self.root / model_file if model_file else self.root
        sha = self._check_files(model_file)
        domain = parse_domain(self.m.get("domain"), self.problems)
        confidence = parse_confidence(self.m.get("confidence"), self.problems)
        drift_reference = parse_drift_reference(self.m.get("drift_reference"), self.problems)
        nnunet = parse_nnunet(self.m.get("nnunet"), self.problems)
        totalsegmentator = parse_totalsegmentator(self.m.get("totalsegmentator"), self.problems)
        stage = nnunet.previous_stage if nnunet is not None else None
        previous = self._previous_stage(stage.package) if stage is not None else None
        images = channels - (len(stage.one_hot_labels) if stage is not None else 0)
        inputs = parse_channels(self.m.get("channels"), images, [m.upper() for m in modalities], self.problems)
        if self.problems or norm is None:
            raise PackageError(self.root, self.problems)
        return ModelPackage(
            root=self.root,
            name=name,
            version=version,
            description=description,
            model_path=model_path,
            model_sha256=sha or "",
            input_name=input_name,
            output_name=output_name,
            input_channels=channels,
            activation=activation,
            modalities=tuple(m.upper() for m in modalities),
            target_spacing=target_spacing,
            normalization=norm,
            patch_size=tuple(patch),
            overlap=float(overlap),
            blending=blending,
            batch_size=batch,
            labels=tuple(labels),
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
            manifest=self.m,
            domain=domain,
            confidence=confidence,
            drift_reference=drift_reference,
            nnunet=nnunet,
            totalsegmentator=totalsegmentator,
            channels=inputs,
            previous_stage=previous,
        )

    def _previous_stage(self, folder: str) -> ModelPackage | None:
        """A cascade's previous stage, loaded as a package; its problems are this package's."""
        try:
            return ModelPackage.load(self.root / folder, verify_hashes=self.verify_hashes)
        except PackageError as exc:
            self.problems.append(f"the cascade's previous stage ('nnunet.previous_stage.package' {folder!r}) "
                                 f"cannot be loaded: {'; '.join(exc.problems)}")
            return None

    def _normalization(self) -> Normalization | None:
        node = self.get("preprocessing.normalization", dict)
        if node is None:
            return None
        kind = self.get("kind", str, where=node)
        if kind not in NORMALIZATION_KINDS:
            self.problems.append(
                f"'preprocessing.normalization.kind' is {kind!r}; allowed: {', '.join(NORMALIZATION_KINDS)}"
            )
            return None
        if kind != "ct_window":
            return Normalization(kind)
        values = {}
        for key in ("lower", "upper", "mean", "std"):
            v = self.get(key, (int, float), where=node)
            if v is None:
                self.problems[-1] = f"'preprocessing.normalization.{key}' is required for ct_window"
            values[key] = v
        if None in values.values():
            return None
        if values["std"] <= 0 or values["lower"] >= values["upper"]:
            self.problems.append(f"'preprocessing.normalization' needs lower < upper and std > 0, got {values}")
        return Normalization(kind, **{k: float(v) for k, v in values.items()})

    def _labels(self) -> list[Label]:
        items = self.get("labels", list)
        labels: list[Label] = []
        if not items:
            if items is not None:
                self.problems.append("'labels' must list at least one label")
            return labels
        for i, item in enumerate(items):
            where = f"labels[{i}]"
            if not isinstance(item, dict):
                self.problems.append(f"'{where}' must be an object")
                continue
            value = self.get("value", int, where=item)
            name = self.get("name", str, where=item)
            codes = [self._code(item, key, where) for key in ("category", "type")]
            optional = {key: self._code(item, key, where) for key in OPTIONAL_LABEL_CODES if key in item}
            if "anatomic_region_modifier" in item and "anatomic_region" not in item:
                self.problems.append(f"'{where}.anatomic_region_modifier' needs an 'anatomic_region' to modify")
            color = item.get("color", [255, 0, 0])
            if not (
                isinstance(color, list) and len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
            ):
                self.problems.append(f"'{where}.color' must be three integers 0-255, got {color!r}")
                color = [255, 0, 0]
            category, kind = codes
            if value is not None and name is not None and category is not None and kind is not None:
                labels.append(Label(value, name, category, kind, (color[0], color[1], color[2]), **optional))
        values = [lab.value for lab in labels]
        if len(labels) == len(items) and sorted(values) != list(range(1, len(values) + 1)):
            self.problems.append(
                f"label values must be 1..{len(values)} (the model's output channels after background), got {values}"
            )
        return labels

    def _code(self, item: dict[str, Any], key: str, where: str) -> Code | None:
        """``item[key]`` as a Code, or None with the problem recorded."""
        c = item.get(key)
        if not (isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("value", "scheme", "meaning"))):
            self.problems.append(f"'{where}.{key}' must be a code object with value, scheme and meaning")
            return None
        return Code(c["value"], c["scheme"], c["meaning"])

    def _check_files(self, model_file: str | None) -> str | None:
        files = self.get("files", dict)
        if files is None or model_file is None:
            return None
        if model_file not in files:
            self.problems.append(f"'files' has no entry for the model file {model_file!r}")
        model_sha = None
        for rel, meta in files.items():
            path = self.root / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                self.problems.append(f"'files' entry {rel!r} must be a path inside the package")
                continue
            expected = meta.get("sha256") if isinstance(meta, dict) else None
            if not isinstance(expected, str):
                self.problems.append(f"'files.{rel}.sha256' is required")
                continue
            if not path.is_file():
                self.problems.append(f"{rel} is listed in the manifest but missing from the package")
                continue
            if self.verify_hashes:
                actual = sha256_file(path)
                if actual != expected:
                    self.problems.append(f"{rel} has sha256 {actual}, the manifest says {expected}")
            if rel == model_file:
                model_sha = expected
        return model_sha


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
