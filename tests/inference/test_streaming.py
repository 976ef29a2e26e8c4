"""Streaming inference gives batch inference's label map, voxel for voxel, whatever order the slices arrive in,
and says in its timeline when it fell back to the whole series."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.imaging.geometry import GeometryPolicy
from edge_runtime.imaging.volume import SliceCache, load_volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage, Normalization
from edge_runtime.inference.pipeline import Segmentation, segment
from edge_runtime.inference.runner import Runner, load_runner
from edge_runtime.inference.streaming import Streams, Timeline
from edge_runtime.inference.tiling import window_starts
from phantom import SeriesInfo, make_phantom, write_series

POLICY = GeometryPolicy()
#: the decode-ahead cache of each Streams under test (weak keys: an id() could be reused by the next Streams,
#: which would then find every slice already decoded and see none arrive)
CACHES: weakref.WeakKeyDictionary[Streams, SliceCache] = weakref.WeakKeyDictionary()


class WindowMeanRunner(Runner):
    """Logits that depend on where the window sits: the input minus the window's own mean (our interface)."""

    name = "window-mean"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((batch.shape[0], self.package.num_classes, *batch.shape[2:]), dtype=np.float32)
        out[:, 1] = batch[:, 0] - batch[:, 0].mean(axis=(1, 2, 3), keepdims=True)
        return out


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesInfo:
    """105 slices of 2 mm (three z-windows of the bundled model at 1.5 mm); 3 mm pixels, one window in-plane."""
    phantom = make_phantom((105, 32, 32), (2.0, 3.0, 3.0), rng=3)
    return write_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("series"))


def stream(
    paths: Sequence[Path],
    package: ModelPackage,
    runner: Runner,
    *,
    streams: Streams | None = None,
    complete: bool = True,
) -> tuple[Segmentation, Timeline]:
    """Decode the slices in ``paths`` order (those already seen are not sent again), running every slab as soon
    as it is ready, then complete the series."""
    streams = streams or Streams(package, POLICY)
    cache = CACHES.setdefault(streams, SliceCache())
    for path in paths:
        if cache.get(path) is None:
            cache.add(path)
            if streams.arrived(7, path, cache):
                while streams.step(runner):
                    pass
    if not complete:
        return Segmentation(np.zeros(0)), Timeline()
    volume = load_volume(list(paths), POLICY, cache)
    return streams.segment(7, volume, runner, lambda: segment(volume, package, runner))


@pytest.fixture(scope="module")
def runner(package: ModelPackage) -> Runner:
    return load_runner(package)


@pytest.fixture(scope="module")
def expected(series: SeriesInfo, package: ModelPackage, runner: Runner) -> Segmentation:
    """Batch inference with the bundled model (ONNX Runtime)."""
    return segment(load_volume(series.paths, POLICY), package, runner)


@pytest.mark.parametrize("order", ["in order", "reverse", "shuffled"])
def test_streamed_labels_are_the_batch_labels_voxel_for_voxel(
    order: str, series: SeriesInfo, package: ModelPackage, runner: Runner, expected: Segmentation
) -> None:
    paths = {
        "in order": series.paths,
        "reverse": series.paths[::-1],
        "shuffled": [series.paths[i] for i in np.random.default_rng(5).permutation(len(series.paths))],
    }[order]
    result, timeline = stream(paths, package, runner)
    assert expected.labels.any(), "the phantom must give some foreground for the comparison to mean something"
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_array_equal(result.confidence, expected.confidence)
    assert result.windows == expected.windows
    if order == "in order":
        assert timeline.mode == "streaming" and timeline.slabs_streamed == 2 and timeline.slabs_at_completion == 1
    else:
        assert timeline.mode == "whole-series" and timeline.slabs_streamed == 0
        assert "not in acquisition order" in timeline.reason


def test_a_slice_below_the_streamed_part_falls_back_to_the_whole_series(
    series: SeriesInfo, package: ModelPackage
) -> None:
    """The first slices are held back: streaming starts from the sixth, then the others break its evidence."""
    runner = WindowMeanRunner(package)
    expected = segment(load_volume(series.paths, POLICY), package, runner)
    result, timeline = stream(series.paths[5:] + series.paths[:5], package, runner)
    assert timeline.mode == "whole-series" and timeline.slabs_streamed >= 1
    assert "beyond the end it was anchored at" in timeline.reason
    np.testing.assert_array_equal(result.labels, expected.labels)


def test_a_gap_waits_for_its_slice(series: SeriesInfo, package: ModelPackage) -> None:
    """A missing slice stops the run (40 slices of 2 mm hold no 64-slice window of 1.5 mm); once it comes, the
    two z-windows it held back run, and the result is batch's."""
    runner = WindowMeanRunner(package)
    expected = segment(load_volume(series.paths, POLICY), package, runner)
    streams = Streams(package, POLICY)
    stream(series.paths[:40] + series.paths[41:], package, runner, streams=streams, complete=False)
    assert streams._sessions[7].timeline.slabs_streamed == 0
    result, timeline = stream(series.paths, package, runner, streams=streams)
    assert timeline.mode == "streaming" and timeline.slabs_streamed == 2
    np.testing.assert_array_equal(result.labels, expected.labels)


def test_uneven_spacing_stops_the_run_and_completion_does_the_rest(package: ModelPackage, tmp_path: Path) -> None:
    """Regular 2 mm for 80 slices (one z-window), then steps of 2.5 and 3.5 mm: the regular part streams, the
    rest waits for completion, where the volume is resampled along the true positions as in batch inference."""
    steps = [2.0] * 79 + [2.5, 3.5] * 12
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    hu = make_phantom((len(positions), 32, 32), (2.0, 3.0, 3.0), rng=4).hu
    info = write_series(hu, (2.0, 3.0, 3.0), tmp_path, slice_positions=list(positions))
    runner = WindowMeanRunner(package)
    expected = segment(load_volume(info.paths, POLICY), package, runner)
    result, timeline = stream(info.paths, package, runner)
    assert timeline.mode == "streaming" and timeline.slabs_streamed == 1 and timeline.slabs_at_completion == 2
    np.testing.assert_array_equal(result.labels, expected.labels)


def test_a_second_stack_breaks_the_evidence(series: SeriesInfo, package: ModelPackage, tmp_path: Path) -> None:
    other = write_series(make_phantom((4, 24, 24), (2.0, 3.0, 3.0), rng=1).hu, (2.0, 3.0, 3.0), tmp_path)
    cache, streams = SliceCache(), Streams(package, POLICY)
    for path in [*series.paths[:10], other.paths[0]]:
        cache.add(path)
        streams.arrived(7, path, cache)
    assert streams._sessions[7].broken.startswith("a second stack")


def test_packages_that_need_the_whole_volume_are_not_streamed(package: ModelPackage) -> None:
    zscore = dataclasses.replace(package, normalization=Normalization("zscore"))
    assert "z-score" in (Streams(zscore, POLICY).reason or "")
    assert "channels" in (Streams(dataclasses.replace(package, input_channels=2), POLICY).reason or "")
    assert Streams(package, POLICY).reason is None


def test_every_window_start_but_the_last_is_independent_of_the_length() -> None:
    for size in range(65, 400, 7):
        starts = window_starts(size, 64, 0.25)
        assert starts[:-1] == list(range(0, 48 * (len(starts) - 1), 48))
        assert starts[-1] == size - 64 and all(b - a <= 48 for a, b in zip(starts, starts[1:], strict=False))


def test_a_series_acquired_top_down_streams_anchored_at_its_top(package: ModelPackage, tmp_path: Path) -> None:
    """Instance numbers counting down the slice normal: batch inference tiles from the top slice (the labels
    are those of the mirrored series tiled from its bottom, mirrored back), and the same series pushed top
    first streams its first z-windows, with batch's labels voxel for voxel."""
    hu = make_phantom((105, 32, 32), (2.0, 3.0, 3.0), rng=6).hu
    info = write_series(hu, (2.0, 3.0, 3.0), tmp_path / "down", instance_number_order="reversed")
    mirrored = write_series(hu[::-1], (2.0, 3.0, 3.0), tmp_path / "mirrored")
    runner = WindowMeanRunner(package)
    expected = segment(load_volume(info.paths, POLICY), package, runner)
    np.testing.assert_array_equal(
        expected.labels, segment(load_volume(mirrored.paths, POLICY), package, runner).labels[::-1]
    )
    from_bottom = write_series(hu, (2.0, 3.0, 3.0), tmp_path / "up")
    assert not np.array_equal(expected.labels, segment(load_volume(from_bottom.paths, POLICY), package, runner).labels)
    result, timeline = stream(info.paths[::-1], package, runner)
    assert timeline.mode == "streaming" and timeline.slabs_streamed == 2 and timeline.slabs_at_completion == 1
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_array_equal(result.confidence, expected.confidence)
    bottom_up, timeline = stream(info.paths, package, runner)
    assert timeline.mode == "whole-series" and "not in acquisition order" in timeline.reason
    np.testing.assert_array_equal(bottom_up.labels, expected.labels)


def test_rows_are_reduced_and_their_logits_dropped_while_the_series_arrives(
    series: SeriesInfo, package: ModelPackage
) -> None:
    """Before completion, the rows below the last z-window (75 of 139 model slices: every slice is in, so the
    grid is at least that deep) are labelled on the source grid and the accumulator holds only the rows in
    flight (a stride and a patch at most, whatever the series' length)."""
    runner = WindowMeanRunner(package)
    streams = Streams(package, POLICY, probabilities=True)
    stream(series.paths, package, runner, streams=streams, complete=False)
    session = streams._sessions[7]
    finishing = session._finishing
    assert finishing is not None
    pz = package.patch_size[0]
    assert window_starts(139, pz, package.overlap)[-1] == 75
    assert finishing.blender.base == 75 and finishing.maps.rows_done == 75
    # 2 mm slices on a 1.5 mm grid: source slices up to 110 mm (the 56th) take model rows below 75
    assert len(finishing.maps.mapped) == 56
    assert finishing.blender._sums.shape[1] <= pz + 48
    assert not finishing.maps._rows  # every source slice is in: no row below 75 is needed any more
    expected = segment(load_volume(series.paths, POLICY), package, runner, probabilities=True)
    result, timeline = stream(series.paths, package, runner, streams=streams)
    assert timeline.mode == "streaming"
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert result.probabilities is not None and expected.probabilities is not None
    np.testing.assert_array_equal(result.probabilities, expected.probabilities)


@pytest.mark.parametrize("numbers", ["spatial", "reversed"])
def test_slices_arriving_in_acquisition_order_become_the_volume_without_a_copy(
    numbers: str, package: ModelPackage, tmp_path: Path
) -> None:
    """Decoded slices are laid side by side as they arrive (bottom up, or top down for a series acquired
    downwards), so the volume at completion is a view of them; a shuffled arrival is copied as before."""
    hu = make_phantom((12, 16, 16), (2.0, 3.0, 3.0), rng=7).hu
    info = write_series(hu, (2.0, 3.0, 3.0), tmp_path, instance_number_order=numbers)
    expected = load_volume(info.paths, POLICY).array
    for order, viewed in (("acquisition", True), ("shuffled", False)):
        paths = info.paths if numbers == "spatial" else info.paths[::-1]
        if order == "shuffled":
            paths = [paths[i] for i in np.random.default_rng(1).permutation(len(paths))]
        cache, streams = SliceCache(), Streams(package, POLICY)
        for path in paths:
            cache.add(path)
            streams.arrived(7, path, cache)
        volume = load_volume(info.paths, POLICY, cache)
        np.testing.assert_array_equal(volume.array, expected)
        assert (volume.array.base is not None) == viewed, order
