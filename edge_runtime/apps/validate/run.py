"""One validation run: every case through every configuration, then the reports.

Per case: the models must take its modality, the geometry policy its volume, and its reference must read onto
that volume, else the case is **skipped** with the reason; each configuration then segments it, its labels are
matched to the reference (:mod:`edge_runtime.quality.matching`) and every metric is computed per matched
structure. An error in a case makes it **failed** and the run goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from edge_runtime.apps.validate.configs import LoadedConfig, ModelConfig, close_configs, open_configs
from edge_runtime.apps.validate.discover import Case, Discovery, case_record, discover_cases, rel
from edge_runtime.apps.validate.markdown import render_markdown
from edge_runtime.apps.validate.plots import write_plots
from edge_runtime.apps.validate.progress import Progress
from edge_runtime.apps.validate.references import Reference, load_reference
from edge_runtime.apps.validate.report import Outcome, build_report, json_safe
from edge_runtime.errors import MissingDependencyError, ValidationError
from edge_runtime.quality.matching import match_labels, structure_maps

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this package for every command
    from edge_runtime.imaging.geometry import GeometryPolicy
    from edge_runtime.imaging.volume import Volume


def run_validation(
    folder: Path | str,
    configs: Sequence[ModelConfig],
    out_dir: Path | str,
    *,
    policy: GeometryPolicy | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    surface: bool = True,
    workers: int = 1,
    plots: bool = True,
    progress: IO[str] | None = None,
) -> dict[str, Any]:
    """Validate the configurations on every case under ``folder``; write the reports; return report.json's dict.

    Raises :class:`ValidationError` when there is nothing to validate, ``PackageError`` / ``RunnerError``
    when a configuration cannot be loaded.
    """
    from edge_runtime.imaging.geometry import GeometryPolicy

    if not 1 <= len(configs) <= 2:
        raise ValidationError(f"one or two configurations, got {len(configs)}")
    root = Path(folder)
    discovery = discover_cases(root)
    if discovery.series_found == 0:
        raise ValidationError(f"no DICOM image series under {root}")
    loaded = open_configs(configs)
    try:
        run = _CaseRun(root, loaded, policy or GeometryPolicy(), surface=surface, workers=workers)
        outcome = run.all(discovery, progress)
        report = build_report(
            root, loaded, discovery, outcome, resamples=resamples, confidence=confidence, seed=seed, surface=surface
        )
    finally:
        close_configs(loaded)
    _write_reports(report, Path(out_dir), plots=plots)
    return report


class _CaseRun:
    """Evaluates cases one after another with the configurations of one run."""

    def __init__(
        self, root: Path, loaded: Sequence[LoadedConfig], policy: GeometryPolicy, *, surface: bool, workers: int
    ):
        self.root = root
        self.loaded = loaded
        self.policy = policy
        self.surface = surface
        self.workers = workers
        #: names of the values of a reference.npz without names: configuration A's labels (see references.py)
        self.label_names = {lab.value: lab.name for lab in loaded[0].package.labels}

    def all(self, discovery: Discovery, progress: IO[str] | None) -> Outcome:
        """Every case of ``discovery``, with a progress line or bar per case."""
        outcome = Outcome(cases=[], skipped=list(discovery.skipped), failed=[])
        bar = Progress(len(discovery.cases), progress)
        for i, case in enumerate(discovery.cases):
            bar.start(i, case.name)
            base = case_record(case, self.root)
            try:
                prepared = self.prepare(case)
                if isinstance(prepared, str):
                    outcome.skipped.append({**base, "reason": prepared})
                    said = f"skipped: {prepared}"
                else:
                    outcome.cases.append(self.evaluate(case, base, *prepared))
                    said = "ok"
            except Exception as exc:  # one bad case must not end the run
                outcome.failed.append({**base, "error": f"{type(exc).__name__}: {exc}"})
                said = f"FAILED: {type(exc).__name__}: {exc}"
            bar.done(i + 1, case.name, said)
        bar.close()
        return outcome

    def prepare(self, case: Case) -> tuple[Volume, Reference] | str:
        """The case's volume and reference, or the reason to skip it."""
        from edge_runtime.imaging.volume import VolumeError, load_volume

        refused = [
            f"{item.id} ({item.package.identity}) takes {'/'.join(item.package.modalities)}"
            for item in self.loaded
            if item.package.modalities and case.modality.upper() not in item.package.modalities
        ]
        if refused:
            return f"modality {case.modality or '(none)'}: model {'; '.join(refused)}"
        try:
            volume = load_volume(case.paths, self.policy)
        except VolumeError as exc:
            return f"volume refused: {exc}"
        try:
            reference = load_reference(case, volume, label_names=self.label_names)
        except (ValueError, OSError) as exc:
            where = rel(case.reference_path, self.root) if case.reference_path else "?"
            return f"reference unusable ({where}): {exc}"
        return volume, reference

    def evaluate(self, case: Case, base: Mapping[str, Any], volume: Volume, reference: Reference) -> dict[str, Any]:
        """The case's report record: its series and reference, and each configuration's result."""
        return {
            **base,
            "modality": case.modality,
            "shape": list(volume.array.shape),
            "spacing_mm": [round(float(s), 6) for s in volume.spacing],
            "reference": {
                "kind": case.reference_kind,
                "path": rel(case.reference_path, self.root) if case.reference_path else None,
                "segments": {str(n): s.name for n, s in reference.segments.items()},
            },
            "notes": case.notes + volume.notes + reference.notes,
            "results": {item.id: self.result(item, volume, reference) for item in self.loaded},
        }

    def result(self, item: LoadedConfig, volume: Volume, reference: Reference) -> dict[str, Any]:
        """One configuration on one case: its time, its label matching and the metrics per matched structure."""
        from edge_runtime.inference.pipeline import segment
        from edge_runtime.quality.metrics import compare_label_maps

        t0 = time.perf_counter()
        seg = segment(volume, item.package, item.runner)
        seconds = time.perf_counter() - t0
        matching = match_labels(item.package.labels, reference.segments)
        result: dict[str, Any] = {"seconds": round(seconds, 4), "matching": matching.to_dict(), "metrics": {}}
        if matching.structures:
            pred, ref = structure_maps(seg.labels, reference.labels, matching)
            indices = range(1, len(matching.structures) + 1)
            metrics = compare_label_maps(
                pred, ref, volume.spacing, labels=indices, surface=self.surface, workers=self.workers
            )
            for index, s in enumerate(matching.structures, start=1):
                values = metrics[index].to_dict()
                del values["label"]
                result["metrics"][s.key] = values
        return result


def _write_reports(report: dict[str, Any], out: Path, *, plots: bool) -> None:
    """report.json, report.md and the box plots into ``out``; ``plots`` and ``plots_note`` say what was drawn."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"], report["plots_note"] = [], None
    if plots and report["cases"]:
        try:
            report["plots"] = write_plots(report, out)
        except MissingDependencyError as exc:
            report["plots_note"] = f"no plots: {exc}"
    elif not report["cases"]:
        report["plots_note"] = "no plots: no case was evaluated"
    else:
        report["plots_note"] = "plots not requested"
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
