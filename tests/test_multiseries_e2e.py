"""Several series in, one result out: a four-channel model (T1, T1c, T2, FLAIR) served from four series of one
study, pushed by DCMTK storescu in separate associations in a shuffled order, comes back from the service as one
SEG at a real PACS (storescp) that references all four series and passes dciodvfy; a study whose FLAIR is on
another Frame of Reference, and one without a FLAIR, are refused with reasons that name the channel.

The model is a fixed-weight 1x1x1 convolution built here with ``onnx.helper``: label ``k`` is where channel
``k`` is bright. Each series has its bright cube at its own place, so a channel given in the wrong order would
move a segment to another cube; two of the series are on other grids (slice and pixel spacing, extent) than the
first, so they are resampled in patient coordinates before the model sees them.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_runtime.inference.package import DEFAULT_PACKAGE
from phantom import write_series
from tests.peers import ServiceProcess, StoreSCP, dciodvfy_errors, spool_record, storescu

pytestmark = pytest.mark.e2e

CHANNELS = ("T1", "T1c", "T2", "FLAIR")
#: each channel's bright cube: centre (x, y, z) in patient mm, half side 6 mm
CUBES = {"T1": (-14.0, -14.0, 0.0), "T1c": (14.0, -14.0, 0.0), "T2": (-14.0, 14.0, 0.0), "FLAIR": (14.0, 14.0, 0.0)}
HALF = 6.0
#: (shape z, y, x; spacing z, y, x) of each channel's series: T1 is the grid of the SEG; T2 and FLAIR differ
GRIDS = {
    "T1": ((12, 32, 32), (3.0, 2.0, 2.0)),
    "T1c": ((12, 32, 32), (3.0, 2.0, 2.0)),
    "T2": ((9, 26, 26), (4.5, 2.6, 2.6)),
    "FLAIR": ((16, 42, 42), (2.5, 1.6, 1.6)),
}
RULES = [
    {"name": "T1", "modality": "MR", "series_description": "^t1$", "contrast": False},
    {"name": "T1c", "modality": "MR", "series_description": "^t1c$", "contrast": True},
    {"name": "T2", "modality": "MR", "series_description": "^t2$"},
    {"name": "FLAIR", "modality": "MR", "series_description": "flair", "image_type": ["ORIGINAL"]},
]


def make_package(root: Path) -> Path:
    """A four-channel package: logits ``[0.5, x_T1, x_T1c, x_T2, x_FLAIR] / 100`` per voxel (1x1x1 conv)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weights = np.zeros((5, 4, 1, 1, 1), dtype=np.float32)
    for c in range(4):
        weights[c + 1, c] = 0.01
    bias = np.array([0.5, 0, 0, 0, 0], dtype=np.float32)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 4, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5, "z", "y", "x"])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"])],
        "four-channels",
        [x],
        [y],
        [
            helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
        ],
    )
    root.mkdir(parents=True)
    model = root / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    default = json.loads((DEFAULT_PACKAGE / "manifest.json").read_text())
    labels = [
        dict(label, value=i + 1, name=f"{name} cube")
        for i, (label, name) in enumerate(zip(default["labels"][:4], CHANNELS, strict=True))
    ]
    manifest = {
        "format": 1,
        "name": "four-channel-test",
        "version": "1.0.0",
        "description": "Test model: label k is where input channel k is bright (not a clinical model).",
        "files": {"model.onnx": {"sha256": hashlib.sha256(model.read_bytes()).hexdigest()}},
        "model": {"file": "model.onnx", "input": "image", "output": "logits", "input_channels": 4},
        "series_filter": {"modalities": ["MR"]},
        "channels": RULES,
        "preprocessing": {"target_spacing": None, "normalization": {"kind": "none"}},
        "inference": {"patch_size": [8, 32, 32], "overlap": 0.5, "blending": "constant", "batch_size": 2},
        "labels": labels,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def voxel_centres(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """(x, y, z) patient coordinates of every voxel of a grid centred on the origin, axial (identity IOP)."""
    origin = origin_of(shape, spacing)
    k, i, j = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    return origin[0] + j * spacing[2], origin[1] + i * spacing[1], origin[2] + k * spacing[0]


def origin_of(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    return -np.array([(shape[2] - 1) * spacing[2], (shape[1] - 1) * spacing[1], (shape[0] - 1) * spacing[0]]) / 2


def in_cube(name: str, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin: float = 0.0) -> np.ndarray:
    cx, cy, cz = CUBES[name]
    h = HALF + margin
    return (abs(x - cx) <= h) & (abs(y - cy) <= h) & (abs(z - cz) <= h)


def write_study(folder: Path, *, channels: tuple[str, ...] = CHANNELS, other_frame: str | None = None) -> dict:
    """One MR study: a series per channel with its cube (value 100 on 0), on the channel's grid."""
    study, frame = generate_uid(), generate_uid()
    series = {}
    for number, name in enumerate(channels, start=1):
        shape, spacing = GRIDS[name]
        image = np.where(in_cube(name, *voxel_centres(shape, spacing)), 100.0, 0.0)
        extra: dict = {"ImageType": ["ORIGINAL", "PRIMARY", "M"]}
        if name == "T1c":
            extra["ContrastBolusAgent"] = "GADOLINIUM"
        series[name] = write_series(
            image,
            spacing,
            folder / name,
            modality="MR",
            origin=origin_of(shape, spacing),
            study_uid=study,
            frame_of_reference_uid=other_frame if name == "FLAIR" and other_frame else frame,
            patient_name="PHANTOM^MULTI",
            series_number=number,
            series_description=name,
            file_prefix=name.lower(),
            extra=extra,
        )
    # a localizer of the same study that no channel rule takes: it must be left alone, not block the study
    series["localizer"] = write_series(
        np.zeros((3, 16, 16)),
        (5.0, 4.0, 4.0),
        folder / "loc",
        modality="MR",
        study_uid=study,
        frame_of_reference_uid=frame,
        series_number=99,
        series_description="3-plane localizer",
        extra={"ImageType": ["DERIVED", "SECONDARY"]},
    )
    return series


def push_shuffled(port: int, series: dict, seed: int) -> None:
    """Each series in its own storescu association, in a shuffled order, with a pause between."""
    order = list(series)
    random.Random(seed).shuffle(order)
    for name in order:
        storescu(port, series[name].paths)
        time.sleep(0.3)


def refusal(service: ServiceProcess, series_uid: str, timeout: float = 30.0) -> str:
    with pytest.raises(RuntimeError, match="refused by the service") as refused:
        spool_record(service.spool, series_uid, timeout)
    return str(refused.value)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: StoreSCP) -> Iterator[ServiceProcess]:
    package = make_package(tmp_path_factory.mktemp("pkg") / "four-channels")
    svc = ServiceProcess(
        tmp_path_factory.mktemp("svc"),
        "--model",
        str(package),
        "--destination",
        pacs.address,
        "--quiet-seconds",
        "2",
        "--study-quiet-seconds",
        "3",
    )
    yield svc
    svc.stop_cleanly()


def seg_masks(path: Path, source: dict) -> dict[int, np.ndarray]:
    """Each segment's mask on the first channel's grid, placed by each frame's source instance."""
    seg = pydicom.dcmread(path)
    index = {uid: k for k, uid in enumerate(source.sop_instance_uids)}
    shape = (len(index), *GRIDS["T1"][0][1:])
    masks: dict[int, np.ndarray] = {}
    pixels = seg.pixel_array.reshape(-1, *shape[1:])
    for frame, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sop = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        masks.setdefault(number, np.zeros(shape, dtype=bool))[index[sop]] |= pixels[frame].astype(bool)
    return masks


def test_four_series_one_seg(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    missing = write_study(tmp_path / "missing", channels=("T1", "T1c", "T2"))
    good = write_study(tmp_path / "good")
    # the study without FLAIR first: its study quiet period runs while the good study arrives
    push_shuffled(service.port, missing, seed=3)
    push_shuffled(service.port, good, seed=7)

    seg_path = pacs.wait_for_seg(good["T1"].series_uid, timeout=60)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    referenced = {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}
    assert referenced == {good[name].series_uid for name in CHANNELS}
    sources = {str(s.ReferencedSOPInstanceUID) for s in seg.SourceImageSequence}
    assert sources == {uid for name in CHANNELS for uid in good[name].sop_instance_uids}
    assert dciodvfy_errors(seg_path) == []
    # exactly one SEG for the study: none for the other channels' series on their own, none for the localizer
    assert len([p for paths in pacs.segs().values() for p in paths]) == 1

    # segment k is channel k's cube on the T1 grid: a channel in the wrong order would put it at another cube
    x, y, z = voxel_centres(*GRIDS["T1"])
    masks = seg_masks(seg_path, good["T1"])
    assert sorted(masks) == [1, 2, 3, 4]
    for number, name in enumerate(CHANNELS, start=1):
        mask, cube = masks[number], in_cube(name, x, y, z)
        assert mask[~in_cube(name, x, y, z, margin=2.0)].sum() == 0, name  # nothing beyond resampling's edge
        assert (mask & cube).sum() >= 0.8 * cube.sum(), name

    record = spool_record(service.spool, good["T1"].series_uid)
    assert record["instances"] == len(good["T1"].paths)

    reason = refusal(service, missing["T1"].series_uid)
    assert "channel-missing" in reason and "FLAIR" in reason, reason
    # its FLAIR arrives late: the refused study is completed by it and segmented
    shape, spacing = GRIDS["FLAIR"]
    late = write_series(
        np.where(in_cube("FLAIR", *voxel_centres(shape, spacing)), 100.0, 0.0),
        spacing,
        tmp_path / "late",
        modality="MR",
        origin=origin_of(shape, spacing),
        study_uid=missing["T1"].study_uid,
        frame_of_reference_uid=missing["T1"].frame_of_reference_uid,
        series_description="FLAIR",
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "M"]},
    )
    storescu(service.port, late.paths)
    seg = pydicom.dcmread(pacs.wait_for_seg(missing["T1"].series_uid, timeout=30), stop_before_pixels=True)
    assert late.series_uid in {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}

    # T2 grows by a slice: the study is segmented again, with the other channels' series as before, as a new SEG
    shape, spacing = GRIDS["T2"]
    grown = write_series(
        np.zeros((shape[0] + 1, *shape[1:])),
        spacing,
        tmp_path / "T2+",
        modality="MR",
        origin=origin_of(shape, spacing),
        study_uid=good["T2"].study_uid,
        series_uid=good["T2"].series_uid,
        frame_of_reference_uid=good["T2"].frame_of_reference_uid,
        series_description="T2",
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "M"]},
    )
    storescu(service.port, grown.paths[-1:])
    end = time.monotonic() + 30
    while len(pacs.segs().get(good["T1"].series_uid, [])) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.segs()[good["T1"].series_uid]]
    assert len({str(s.SOPInstanceUID) for s in segs}) == 2
    assert sorted(len(s.SourceImageSequence) for s in segs) == [len(sources), len(sources) + 1]
    assert len(list(service.output.glob("*/seg.dcm"))) == 3  # each result in its own folder


def test_other_frame_of_reference_refused(service: ServiceProcess, pacs: StoreSCP, tmp_path: Path) -> None:
    study = write_study(tmp_path / "moved", other_frame=generate_uid())
    push_shuffled(service.port, study, seed=5)
    reason = refusal(service, study["T2"].series_uid)
    assert "frame-of-reference-mismatch" in reason and "FLAIR" in reason, reason
    assert study["T1"].series_uid not in pacs.segs()


def held_series(spool: Path) -> int:
    con = sqlite3.connect(f"file:{spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM series WHERE state='held'").fetchone()[0]
    finally:
        con.close()


def test_held_channels_survive_a_restart(pacs: StoreSCP, tmp_path: Path) -> None:
    """Three channels arrive and are held; the service restarts; the fourth arrives: one SEG of all four."""
    package = make_package(tmp_path / "pkg")
    study = write_study(tmp_path / "study")
    args = (
        "--model",
        str(package),
        "--destination",
        pacs.address,
        "--quiet-seconds",
        "1",
        "--study-quiet-seconds",
        "60",
    )
    first = ServiceProcess(tmp_path / "svc", *args)
    try:
        for name in ("T2", "T1", "T1c"):
            storescu(first.port, study[name].paths)
        end = time.monotonic() + 30
        while held_series(first.spool) < 3 and time.monotonic() < end:
            time.sleep(0.1)
        assert held_series(first.spool) == 3
    finally:
        assert first.stop() == 0
    second = ServiceProcess(tmp_path / "svc", *args)
    try:
        storescu(second.port, study["FLAIR"].paths)
        seg = pydicom.dcmread(pacs.wait_for_seg(study["T1"].series_uid, timeout=60), stop_before_pixels=True)
        assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {
            study[name].series_uid for name in CHANNELS
        }
    finally:
        assert second.stop() == 0
    assert "Traceback" not in second.log()
