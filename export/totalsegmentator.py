"""``edge-export package --totalsegmentator WEIGHTS --task total``: a TotalSegmentator weights folder as ONE package.

TotalSegmentator (``pip install --no-deps totalsegmentator``: its task table, class maps and SNOMED CT mapping;
it brings no weights) runs a task as one or several nnU-Net models: ``total`` is five datasets (291-295), each
segmenting a part of the 117 classes, merged into one label map; ``total --fast`` is one model at 3 mm. This
command reads TotalSegmentator's own tables to find the task's models in the weights folder
(``Dataset291_.../nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth`` ...), puts every
part's network into one ONNX graph (:class:`export.totalsegmentator_model.PartsModel`), and writes the manifest's
``"nnunet"`` section (the pipeline the parts share, one normalisation per part) and ``"totalsegmentator"``
section (TotalSegmentator's
steps around nnU-Net and each part's class mapping: :mod:`edge_runtime.inference.totalsegmentator.settings`).
Segments are named by TotalSegmentator's class names and coded from its SNOMED CT mapping.

The gate (:mod:`export.totalsegmentator_gate`) runs the package in the runtime and TotalSegmentator's own steps
with nnunetv2's ``nnUNetPredictor`` per part on phantom CTs (and ``--parity-series``), and publishes the package
when every part's label map and the merged one agree (Dice per class >= ``--min-dice``) and the ONNX graph's
logits agree with the PyTorch parts' on windows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.resources
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import StartupError
from edge_runtime.inference.nnunet.settings import NnunetSettings
from edge_runtime.inference.totalsegmentator.settings import Part, TotalSegmentatorSettings
from export.commands import CommandError, _Staging, export_domain

#: TotalSegmentator's multi-part tasks: the class maps of their parts and which dataset is which part
#: (``nnUNet_predict_image``'s choice by ``task_name``)
PART_TABLES = {
    "total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
    "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
    "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr"),
    "headneck_muscles": ("class_map_parts_headneck_muscles", "map_taskid_to_partname_headneck_muscles"),
}
#: tasks whose tile step TotalSegmentator raises to 0.8 (``nnUNet_predict_image``)
FAST_TILING = ("total", "total_v3", "total_mr")
#: a class TotalSegmentator's SNOMED CT mapping lacks is coded as what it is known to be, no more
GENERIC_CATEGORY = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
GENERIC_TYPE = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}
NOT_REPRODUCED = [
    "TotalSegmentator (2.18) splits an image of more than 512x512x900 voxels on its grid, with more than 200 "
    "slices, into three z-slabs with a 20-voxel margin and predicts them one by one (a memory measure); the "
    "runtime predicts it whole, so labels can differ near those seams",
    "the options of the TotalSegmentator command that are off by default (--roi_subset, --crop, --body_seg, "
    "--remove_small_blobs, --higher_order_resampling, statistics)",
    "TotalSegmentator reads its resampled image back from NIfTI, whose header stores the spacing as float32; "
    "the runtime uses the exact spacing",
]


def add_totalsegmentator_arguments(p: argparse.ArgumentParser) -> None:
    """``--task`` (the source option ``--totalsegmentator`` sits with the other sources)."""
    g = p.add_argument_group("TotalSegmentator (with --totalsegmentator WEIGHTS)")
    g.add_argument("--task", default="total",
                   help="TotalSegmentator task (total, total_mr, ...); a _fast or _fastest suffix picks that "
                        "sub-mode, as the command's --fast / --fastest (default total)")


@dataclass(frozen=True)
class TaskPlan:
    """What TotalSegmentator would run for a task: ``get_task_config`` and ``nnUNet_predict_image``'s choices."""

    task: str
    #: the class map the result is written in (``class_map[task]``)
    class_map: dict[int, str]
    task_ids: tuple[int, ...]
    #: per part: its class map (part index -> name) and its name; empty for a single model
    part_maps: tuple[tuple[str, dict[int, str]], ...]
    resample_mm: float | None
    trainer: str
    plans: str
    model: str
    folds: tuple[str, ...]
    step_size: float


def plan_task(name: str) -> TaskPlan:
    """TotalSegmentator's configuration of ``name`` (``total``, ``total_fast`` ...) from its own tables."""
    from edge_runtime.extras import MissingDependencyError, require

    try:
        require("totalsegmentator", feature="TotalSegmentator packages", package="totalsegmentator")
    except MissingDependencyError as exc:
        raise CommandError(f"{exc} (pip install --no-deps totalsegmentator: its tables only)") from exc
    from totalsegmentator import map_to_binary
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS

    task, mode = name, "default"
    for suffix in ("_fastest", "_fast"):
        if name.endswith(suffix) and name[: -len(suffix)] in TASK_CONFIGS:
            task, mode = name[: -len(suffix)], suffix[1:]
            break
    if task not in TASK_CONFIGS:
        raise CommandError(f"TotalSegmentator has no task {name!r}")
    raw = TASK_CONFIGS[task]
    config = dict(DEFAULT_CONFIG)
    if "sub_modes" in raw:
        modes = raw["sub_modes"]
        config.update(modes.get(mode) or modes["fast" if mode != "default" else "default"])
    elif mode != "default":
        raise CommandError(f"TotalSegmentator's task {task!r} has no {mode} mode")
    else:
        config.update({k: v for k, v in raw.items() if k not in ("disallow_fast", "commercial", "info_msg")})
    for key in ("crop", "cascade", "remove_outside", "remove_mask"):
        if config.get(key):
            raise CommandError(f"task {name!r} needs TotalSegmentator's {key!r} step, which the runtime does not "
                               "reproduce")
    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    part_maps: tuple[tuple[str, dict[int, str]], ...] = ()
    if len(ids) > 1:
        if task not in PART_TABLES:
            raise CommandError(f"task {task!r} has {len(ids)} models but no part table the runtime knows")
        maps_name, ids_name = PART_TABLES[task]
        maps, names = getattr(map_to_binary, maps_name), getattr(map_to_binary, ids_name)
        part_maps = tuple((names[t], dict(maps[names[t]])) for t in ids)
    resample = config.get("resample")
    if isinstance(resample, (list, tuple)):
        if len(set(resample)) != 1:
            raise CommandError(f"task {name!r} resamples anisotropically ({resample}); not reproduced")
        resample = resample[0]
    return TaskPlan(
        task=task, class_map=dict(map_to_binary.class_map[task]), task_ids=tuple(int(t) for t in ids),
        part_maps=part_maps, resample_mm=None if resample is None else float(resample),
        trainer=str(config.get("trainer") or "nnUNetTrainer"), plans=str(config.get("plans") or "nnUNetPlans"),
        model=str(config.get("model") or "3d_fullres"), folds=tuple(str(f) for f in config.get("folds") or [0]),
        step_size=0.8 if task in FAST_TILING else 0.5,
    )


@dataclass
class TotalSegmentatorSource:
    plan: TaskPlan
    #: one ``export.nnunet_source.NnunetSource`` per part
    parts: list[Any]
    #: every part in one torch module (:class:`export.totalsegmentator_model.PartsModel`)
    module: Any
    settings: NnunetSettings
    ts: TotalSegmentatorSettings
    #: package label value -> (TotalSegmentator class value, class name)
    labels: dict[int, tuple[int, str]]

    @property
    def window(self) -> tuple[int, int, int]:
        window: tuple[int, int, int] = self.parts[0].window
        return window


def load_totalsegmentator(weights: Path, task: str, *, allow_pickle: bool = False) -> TotalSegmentatorSource:
    """The task's models from ``weights`` (a folder of ``DatasetNNN_*`` nnU-Net results), checked against
    TotalSegmentator's class maps, as one source."""
    from export.loaders.base import LoaderError
    from export.nnunet_source import load_nnunet_source

    plan = plan_task(task)
    sources = []
    for tid in plan.task_ids:
        found = sorted(Path(weights).glob(f"Dataset{tid:03d}_*/{plan.trainer}__{plan.plans}__{plan.model}"))
        if len(found) != 1:
            raise CommandError(f"{weights} has {len(found)} folders Dataset{tid:03d}_*/{plan.trainer}__{plan.plans}__"
                               f"{plan.model} (task {task} needs exactly one)")
        try:
            source = load_nnunet_source(found[0], plan.folds, configuration=plan.model, allow_pickle=allow_pickle,
                                        use_mirroring=False, tile_step_size=plan.step_size)
        except LoaderError as exc:
            raise CommandError(f"{found[0].parent.name}: {exc}") from exc
        if source.input_channels != 1:
            raise CommandError(f"{found[0].parent.name} takes {source.input_channels} channels; parts take one")
        sources.append(source)
    settings = _shared_settings(sources)
    inverse = {name: value for value, name in plan.class_map.items()}
    luts = []
    for i, source in enumerate(sources):
        part_map = plan.part_maps[i][1] if plan.part_maps else plan.class_map
        lut = [0]
        for index in range(1, source.num_classes):
            name = source.label_names[index]
            if part_map.get(index) != name or name not in inverse:
                raise CommandError(f"{source.root.parent.name}: class {index} is {name!r} in its dataset.json; "
                                   f"TotalSegmentator's map says {part_map.get(index)!r}")
            if not plan.part_maps and inverse[name] != index:
                raise CommandError(f"{source.root.parent.name}: class {name!r} is {index}, TotalSegmentator's "
                                   f"{task} map has it as {inverse[name]}")
            lut.append(inverse[name])
        luts.append(lut)
    used = sorted({v for lut in luts for v in lut[1:]})
    renumber = {ts_value: i + 1 for i, ts_value in enumerate(used)}  # the identity for the full task
    parts = tuple(
        Part(tid, plan.part_maps[i][0] if plan.part_maps else plan.task, s.root.parent.name, s.num_classes,
             tuple(0 if v == 0 else renumber[v] for v in lut))
        for i, (tid, s, lut) in enumerate(zip(plan.task_ids, sources, luts, strict=True))
    )
    ts = TotalSegmentatorSettings(task=task, parts=parts, resample_mm=plan.resample_mm)
    from export.totalsegmentator_model import PartsModel  # torch only once a package is made

    module = PartsModel([s.module for s in sources]).eval()
    labels = {renumber[v]: (v, plan.class_map[v]) for v in used}
    return TotalSegmentatorSource(plan, sources, module, settings, ts, labels)


def _shared_settings(sources: Sequence[Any]) -> NnunetSettings:
    """The first part's pipeline with every part's normalisation, one per input channel; parts that differ in
    anything else cannot share one sliding window, and are refused."""
    first: NnunetSettings = sources[0].settings
    keys = ("transpose_forward", "spacing", "patch_size", "resampling_data", "resampling_probabilities",
            "tile_step_size", "use_mirroring")
    for source in sources[1:]:
        differ = [k for k in keys if getattr(source.settings, k) != getattr(first, k)]
        if differ:
            raise CommandError(f"{source.root.parent.name} differs from {sources[0].root.parent.name} in "
                               f"{', '.join(differ)}; the runtime runs the parts in one sliding window")
    return dataclasses.replace(first, normalization=tuple(s.settings.normalization[0] for s in sources))


#: the columns of TotalSegmentator's SNOMED CT mapping, by the manifest's name for each label code (the
#: Segment Description Macro's sequences; a modifier mostly says which side: SCT 7771000 Left, 24028007 Right)
MAPPING_COLUMNS = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "type_modifier": "SegmentedPropertyTypeModifierCodeSequence",
    "anatomic_region": "AnatomicRegionSequence",
    "anatomic_region_modifier": "AnatomicRegionModifierSequence",
}


def snomed_labels(labels: dict[int, tuple[int, str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest labels coded from TotalSegmentator's SNOMED CT mapping (category, type, and where the mapping
    has them, the type's modifier and the anatomic region with its modifier), and the names it has no codes
    for."""
    table = importlib.resources.files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    with table.open(encoding="utf-8") as f:
        rows = {row["Structure"]: row for row in csv.DictReader(f)}
    out, missing = [], []
    for value, (ts_value, name) in sorted(labels.items()):
        row = rows.get(name)
        entry: dict[str, Any] = {"value": value, "name": name, "totalsegmentator_value": ts_value}
        if row is None:
            missing.append(name)
            entry.update(category=GENERIC_CATEGORY, type=GENERIC_TYPE, color=[255, 0, 0],
                         codes="generic: TotalSegmentator's SNOMED CT mapping has no row for this class")
        else:
            for key, column in MAPPING_COLUMNS.items():
                if row.get(f"{column}.CodeValue"):
                    entry[key] = {"value": row[f"{column}.CodeValue"], "meaning": row[f"{column}.CodeMeaning"],
                                  "scheme": row[f"{column}.CodingSchemeDesignator"]}
            entry["color"] = [int(c) for c in row["DicomRGBColor"].split(",")]
        out.append(entry)
    return out, missing


def run_totalsegmentator_package(args: argparse.Namespace) -> int:
    from export.nnunet_command import gate_volumes

    try:
        source = load_totalsegmentator(args.totalsegmentator, args.task, allow_pickle=args.allow_pickle)
        volumes = gate_volumes(source.parts[0], args)
        manifest = totalsegmentator_manifest(source, args)
        stage = _Staging(args.out, args.overwrite)
    except StartupError as exc:
        print(f"edge-export package: {exc}", file=sys.stderr)
        return 2
    from export.totalsegmentator_gate import build_and_gate

    return build_and_gate(args, source, manifest, volumes, stage)


def totalsegmentator_manifest(source: TotalSegmentatorSource, args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version as installed

    from export.nnunet_source import runtime_hints

    plan = source.plan
    labels, missing = snomed_labels(source.labels)
    if missing:
        print(f"edge-export package: no SNOMED CT codes in TotalSegmentator's mapping for {', '.join(missing)}; "
              "coded as 'Anatomical structure'", file=sys.stderr)
    hints = runtime_hints(source.parts[0])
    name = args.name or f"totalsegmentator-{args.task}"
    version = args.version or installed("totalsegmentator")
    section = source.ts.to_dict()
    section.update(totalsegmentator_version=installed("totalsegmentator"), trainer=plan.trainer, plans=plan.plans,
                   folds=list(plan.folds), tile_step_size=plan.step_size, test_time_mirroring=False,
                   codes_missing=missing, not_reproduced=NOT_REPRODUCED)
    return {
        "name": name,
        "version": version,
        "description": args.description or f"TotalSegmentator task {args.task} ({len(source.parts)} nnU-Net "
        f"model(s) merged as TotalSegmentator merges them), exported by edge-export.",
        "model": {"input": "image", "output": "logits", "input_channels": len(source.parts),
                  "activation": "softmax"},
        "series_filter": {"modalities": args.modality or hints["modalities"]},
        "preprocessing": {"target_spacing": [plan.resample_mm] * 3 if plan.resample_mm else hints["target_spacing"],
                          "normalization": hints["normalization"]},
        "inference": {"patch_size": hints["patch_size"], "overlap": hints["overlap"], "blending": "gaussian",
                      "batch_size": args.batch_size or 1},
        "labels": labels,
        "algorithm": {"name": "TotalSegmentator", "version": version, "family": "artificial-intelligence"},
        "source": {"kind": "totalsegmentator", "task": args.task, "datasets": [p.dataset for p in source.ts.parts]},
        "nnunet": source.settings.to_dict(),
        "totalsegmentator": section,
        "domain": export_domain(args, args.modality or hints["modalities"]),
    }


def build_onnx(source: TotalSegmentatorSource, tmp: Path, args: argparse.Namespace) -> Any:
    from export.onnx import export_onnx_with_info

    try:
        return export_onnx_with_info(source.module, tmp / "model.onnx",
                                     example_shape=(1, len(source.parts), *source.window), opset=args.opset,
                                     simplify=not args.no_simplify)
    except Exception as exc:  # torch.export / the exporters raise many types; one message for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CommandError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
