"""The nnU-Net parity gate: nnunetv2's own ``nnUNetPredictor`` against the runtime's nnU-Net pipeline.

Both run on the same volumes (phantom CTs and real series, each as the runtime's volume builder sees it: the
``(slice, row, column)`` array and spacing that nnU-Net's SimpleITK reader would give for the series), with the
package's folds, mirroring and tile step. The gate passes when every label's Dice between the two label maps
reaches ``min_dice`` and the largest difference between the two softmax probabilities of any class at any voxel
stays within ``max_probability_error``. Both accumulate the blended logits in float16 by default (the manifest's
``accumulate``), but the network's logits come from ONNX Runtime on one side and torch on the other, so the
probabilities differ by a few thousandths where the logits are large; the default tolerance is 0.02.

When the package trades accuracy for speed (mirroring off, a larger tile step), nnU-Net is also run as its
authors run it (mirroring on, step 0.5) and the report lists what the switch costs in Dice: reported, not gated.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.inference.nnunet.pipeline import predict_package_case
from edge_runtime.inference.nnunet.postprocessing import KeepLargestComponent
from edge_runtime.inference.package import ModelPackage
from export.nnunet_source import NnunetSource
from export.parity import LabelAgreement, gate_markdown, label_dice

#: nnUNetPredictor's defaults: what a switch for speed is measured against
DEFAULT_TILE_STEP = 0.5


@dataclass(frozen=True)
class NnunetGateOptions:
    min_dice: float = 0.99
    max_probability_error: float = 0.02


@dataclass(frozen=True)
class ProbabilityAgreement:
    volume: str
    max_abs_error: float
    mean_abs_error: float
    #: fraction of voxels whose labels differ
    label_disagreement: float


@dataclass
class NnunetParityReport:
    """Dice per label and probability error per volume; ``cost`` is the Dice against nnU-Net's defaults when the
    package switched something off for speed (not gated)."""

    segmentation: list[LabelAgreement]
    probabilities: list[ProbabilityAgreement]
    options: NnunetGateOptions
    reference: str
    candidate: str
    settings: dict[str, Any]
    cost: list[LabelAgreement] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures()

    @property
    def needed_min_dice(self) -> float | None:
        return min((d.dice for d in self.segmentation), default=None)

    @property
    def needed_probability_error(self) -> float:
        return max((p.max_abs_error for p in self.probabilities), default=0.0)

    def failures(self) -> list[str]:
        out = [f"{d.volume} label {d.label} {d.name}: Dice {d.dice:.4f} (needed {self.options.min_dice})"
               for d in self.segmentation if not d.passed(self.options.min_dice)]
        out += [f"{p.volume}: probabilities differ by up to {p.max_abs_error:.4f} (allowed "
                f"{self.options.max_probability_error})"
                for p in self.probabilities if p.max_abs_error > self.options.max_probability_error]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "min_dice": self.options.min_dice,
            "max_probability_error": self.options.max_probability_error,
            "needed_min_dice": self.needed_min_dice,
            "needed_probability_error": self.needed_probability_error,
            "settings": self.settings,
            "segmentation": [asdict(d) for d in self.segmentation],
            "probabilities": [asdict(p) for p in self.probabilities],
            "cost_against_nnunet_defaults": [asdict(d) for d in self.cost],
            "timings_s": self.timings,
        }

    def table(self) -> str:
        rows = ["| volume | label | Dice | nnU-Net voxels | runtime voxels | pass |", "|---|---|---:|---:|---:|---|"]
        rows += [f"| {d.volume} | {d.label} {d.name} | {d.dice:.4f} | {d.reference_voxels} | {d.candidate_voxels} "
                 f"| {'yes' if d.passed(self.options.min_dice) else 'NO'} |" for d in self.segmentation]
        rows += ["", "| volume | max abs probability error | mean abs error | voxels with other label | pass |",
                 "|---|---:|---:|---:|---|"]
        rows += [f"| {p.volume} | {p.max_abs_error:.4g} | {p.mean_abs_error:.3g} | {p.label_disagreement:.3g} "
                 f"| {'yes' if p.max_abs_error <= self.options.max_probability_error else 'NO'} |"
                 for p in self.probabilities]
        if self.cost:
            rows += ["", "What the speed settings cost (runtime as packaged against nnU-Net with mirroring on and "
                     "tile step 0.5; not gated):", "", "| volume | label | Dice |", "|---|---|---:|"]
            rows += [f"| {d.volume} | {d.label} {d.name} | {d.dice:.4f} |" for d in self.cost]
        return "\n".join(rows)

    def markdown(self, title: str = "nnU-Net parity") -> str:
        s = self.settings
        lines = [
            f"Settings: configuration {s.get('configuration')}, folds {', '.join(s.get('folds', []))}, mirroring "
            f"{_mirroring(s)}, tile step {s.get('tile_step_size')}, logits accumulated in {s.get('accumulate')}.",
            f"Gate: Dice >= {self.options.min_dice:g} per label and volume; "
            f"{'region sigmoid' if s.get('regions') else 'softmax'} probabilities within "
            f"{self.options.max_probability_error:g} at every voxel.",
            f"Needed: min Dice {self.needed_min_dice if self.needed_min_dice is not None else float('nan'):.4f}, "
            f"probability error {self.needed_probability_error:.4g}.",
            "",
            self.table(),
            "",
        ]
        return gate_markdown(self, title, lines)


def _mirroring(settings: dict[str, Any]) -> str:
    if not settings.get("mirror_axes"):
        return "none (the checkpoint allows no axes)"
    return f"on over axes {settings['mirror_axes']}" if settings.get("use_mirroring") else "off"


class NnunetReference:
    """nnunetv2's ``nnUNetPredictor`` initialised from the trained-model folder's plans, dataset.json and the
    chosen folds' weights (``manual_initialization``: nnU-Net's trainer lookup imports every trainer module, some
    of which need packages inference does not), on the CPU.

    A cascade stage has its previous stage's predictor beside it and predicts as nnU-Net's command line chains
    them: the previous stage's label map (``nnUNetv2_predict -c 3d_lowres``, no post-processing) is handed to
    this stage as its ``-prev_stage_predictions`` file is read back, float32 (SimpleITK's reader), so that
    ``crop_to_nonzero`` can mark background outside the image's non-zero mask -1 as it does there."""

    def __init__(self, source: NnunetSource, *, use_mirroring: bool, tile_step_size: float):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from export.loaders.nnunet import _checkpoint_weights, _read_checkpoint

        plans = PlansManager(source.plans)
        config = plans.get_configuration(source.configuration)
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        network = nnUNetTrainer.build_network_architecture(
            plans, config, source.input_channels, source.output_channels, enable_deep_supervision=False
        )
        parameters = [
            _checkpoint_weights(_read_checkpoint(source.root / f"fold_{f}" / "checkpoint_final.pth", True))
            for f in source.folds
        ]
        self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                         use_mirroring=use_mirroring, device=torch.device("cpu"), allow_tqdm=False)
        self.predictor.manual_initialization(network, plans, config, parameters, source.dataset, "nnUNetTrainer",
                                             source.settings.mirror_axes or None)
        #: nnU-Net's own post-processing functions with the package's steps (nnUNetv2_apply_postprocessing)
        self.postprocessing = postprocessing_functions(source.settings.active_postprocessing)
        pp = f", then {len(self.postprocessing[0])} post-processing step(s)" if self.postprocessing[0] else ""
        self.previous = (NnunetReference(source.previous, use_mirroring=use_mirroring, tile_step_size=tile_step_size)
                         if source.previous is not None else None)
        cascade = f", after {source.previous.configuration}" if source.previous is not None else ""
        self.describe = (f"nnunetv2 {_version('nnunetv2')} nnUNetPredictor {source.configuration}{cascade} (torch "
                         f"{torch.__version__}, cpu, mirroring {'on' if use_mirroring else 'off'}, tile step "
                         f"{tile_step_size}{pp})")

    def predict(self, image: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Label map and ``(K, ...)`` probabilities for a ``(C, Z, Y, X)`` image with its ``(z, y, x)`` spacing."""
        previous = None
        if self.previous is not None:
            previous = self.previous.predict(image, spacing)[0][None].astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nnunetv2 and its helpers warn about their own dependencies
            seg, probs = self.predictor.predict_single_npy_array(
                image.astype(np.float32), {"spacing": [float(s) for s in spacing]}, previous, None, True
            )
            if self.postprocessing[0]:
                from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

                seg = apply_postprocessing(np.asarray(seg), *self.postprocessing)
        return np.asarray(seg), np.asarray(probs, dtype=np.float32)


def postprocessing_functions(steps: Sequence[KeepLargestComponent]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The steps as nnU-Net's ``(pp_fns, pp_fn_kwargs)``: its own function, regions as tuples."""
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    kwargs = [{"labels_or_regions": list(step.labels_or_regions), "background_label": step.background_label}
              for step in steps]
    return [keep_largest] * len(steps), kwargs


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def run_nnunet_gate(
    source: NnunetSource,
    package: ModelPackage,
    volumes: Mapping[str, tuple[np.ndarray, tuple[float, ...]]],
    options: NnunetGateOptions = NnunetGateOptions(),
    *,
    runner: Any = None,
) -> NnunetParityReport:
    """``volumes``: name -> (``(C, Z, Y, X)`` image in modality units, ``(z, y, x)`` spacing). The candidate is
    the package in ONNX Runtime on the CPU unless ``runner`` is given."""
    import time

    from edge_runtime.inference.runner import load_runner

    settings = package.nnunet
    if settings is None:
        raise ValueError(f"{package.identity} has no 'nnunet' section")
    reference = NnunetReference(source, use_mirroring=settings.use_mirroring, tile_step_size=settings.tile_step_size)
    faster = not settings.use_mirroring and bool(settings.mirror_axes) or settings.tile_step_size > DEFAULT_TILE_STEP
    defaults = NnunetReference(source, use_mirroring=True, tile_step_size=DEFAULT_TILE_STEP) if faster else None
    close = runner is None
    runner = runner or load_runner(package)
    names = {lab.value: lab.name for lab in package.labels}
    classes = len(package.labels) + 1  # of the label map (a region model outputs one channel per region)
    dice: list[LabelAgreement] = []
    cost: list[LabelAgreement] = []
    probs: list[ProbabilityAgreement] = []
    timings = {"nnunet_s": 0.0, "runtime_s": 0.0}
    try:
        for name, (image, spacing) in volumes.items():
            t0 = time.perf_counter()
            ref_labels, ref_probs = reference.predict(image, spacing)
            timings["nnunet_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = predict_package_case(image, spacing, package, runner, probabilities=True)
            timings["runtime_s"] += time.perf_counter() - t0
            dice += label_dice(name, ref_labels, ours.labels, names, classes)
            assert ours.probabilities is not None
            error = np.abs(ours.probabilities - ref_probs)
            probs.append(ProbabilityAgreement(name, float(error.max()), float(error.mean()),
                                              float(np.mean(ref_labels != ours.labels))))
            if defaults is not None:
                cost += label_dice(name, defaults.predict(image, spacing)[0], ours.labels, names, classes)
    finally:
        if close:
            runner.close()
    return NnunetParityReport(dice, probs, options, reference.describe, runner.describe(), settings.to_dict(),
                              cost, {k: round(v, 3) for k, v in timings.items()})
