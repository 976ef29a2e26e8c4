"""The MONAI Deploy App SDK spleen application (the whole-run anchor), with per-operator timers.

The DAG is the stock ``examples/apps/ai_spleen_seg_app/app.py`` of monai-deploy-app-sdk, in the same order:

    DICOMDataLoaderOperator (CountCondition 1) -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator
      -> MonaiBundleInferenceOperator (pre-processing, SlidingWindowInferer, post-processing from the bundle
         configs inside the TorchScript file) -> DICOMSegmentationWriterOperator

with the stock SegmentDescription and custom tag, ``omit_empty_frames=True``. Two deviations, both from the
baseline report (the MONAI Deploy baseline study (monai-deploy-baseline.md) §6): the selection rule is reduced to
``Modality CT`` (the stock rule also requires StudyDescription/SeriesDescription), and monai 1.6.1 is used.
Each operator is a thin subclass whose ``compute`` calls ``super()`` inside a timer (the bundle operator's
``pre_process``/``predict``/``post_process`` too), and the sliding window's predictor is wrapped to time the
network forward calls; nothing else is replaced.

Run it in the venv made by ``setup.sh`` (``benchmarks/monai_deploy/run.sh`` wraps it in /usr/bin/time -v)::

    ulimit -s 32768
    benchmarks/results/mdvenv/bin/python benchmarks/monai_deploy/app.py -i SERIES_DIR -o OUT_DIR -m MODEL.ts \
        [--timings OUT_DIR/timings.json]

MODEL.ts is written by ``python -m benchmarks.make_spleen_package`` (the same UNet and weights as the ONNX
package). This file runs in the MONAI Deploy venv, not the project's: it imports nothing from the project.
"""

import time

T_START = time.perf_counter()

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

TIMINGS: dict = {"operators": {}}


def _pop_timings_arg() -> Path | None:
    if "--timings" in sys.argv:
        i = sys.argv.index("--timings")
        path = Path(sys.argv[i + 1])
        del sys.argv[i : i + 2]
        return path
    return None


TIMINGS_PATH = _pop_timings_arg()

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402
from monai.deploy.core.domain import Image  # noqa: E402
from monai.deploy.core.io_type import IOType  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_seg_writer_operator import (  # noqa: E402
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: E402
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator  # noqa: E402
from monai.deploy.operators.monai_bundle_inference_operator import (  # noqa: E402
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.sr.codedict import codes  # noqa: E402

TIMINGS["imports_s"] = time.perf_counter() - T_START


def _add(key: str, dt: float) -> None:
    TIMINGS[key] = TIMINGS.get(key, 0.0) + dt


@contextmanager
def _stopwatch(key: str):
    """Add the time spent in the ``with`` block to ``TIMINGS[key]``, also when it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _add(key, time.perf_counter() - t0)


def _wrap_sliding_window() -> None:
    """Time the sliding window and, inside it, the network forward calls (SlidingWindowInferer calls the
    module-level ``sliding_window_inference`` of ``monai.inferers.inferer``)."""
    import monai.inferers.inferer as inferer_module

    original = inferer_module.sliding_window_inference

    def timed_swi(inputs, roi_size, sw_batch_size, predictor, *args, **kwargs):
        def timed_predictor(x, *a, **k):
            t0 = time.perf_counter()
            try:
                return predictor(x, *a, **k)
            finally:
                _add("network_forward_s", time.perf_counter() - t0)
                TIMINGS["network_calls"] = TIMINGS.get("network_calls", 0) + 1
                TIMINGS["network_patches"] = TIMINGS.get("network_patches", 0) + int(x.shape[0])

        with _stopwatch("sliding_window_s"):
            return original(inputs, roi_size, sw_batch_size, timed_predictor, *args, **kwargs)

    inferer_module.sliding_window_inference = timed_swi


_wrap_sliding_window()


def _timed(base):
    class Timed(base):
        def compute(self, op_input, op_output, context):
            t0 = time.perf_counter()
            try:
                return super().compute(op_input, op_output, context)
            finally:
                TIMINGS["operators"].setdefault(self.name, 0.0)
                TIMINGS["operators"][self.name] += time.perf_counter() - t0

    Timed.__name__ = base.__name__
    return Timed


class TimedBundleOp(_timed(MonaiBundleInferenceOperator)):
    """The bundle operator with its pre-processing, predict (model load + sliding window) and
    post-processing timed separately."""

    def pre_process(self, data, *args, **kwargs):
        with _stopwatch("bundle_pre_process_s"):
            return super().pre_process(data, *args, **kwargs)

    def predict(self, data, *args, **kwargs):
        with _stopwatch("bundle_predict_s"):
            return super().predict(data, *args, **kwargs)

    def post_process(self, data, *args, **kwargs):
        with _stopwatch("bundle_post_process_s"):
            return super().post_process(data, *args, **kwargs)


RULES = """
{
    "selections": [
        {
            "name": "CT Series",
            "conditions": {
                "Modality": "(?i)CT"
            }
        }
    ]
}
"""


class AISpleenSegApp(Application):
    def compose(self):
        app_context = Application.init_app_context(self.argv)
        app_input_path = Path(app_context.input_path)
        app_output_path = Path(app_context.output_path)

        study_loader_op = _timed(DICOMDataLoaderOperator)(
            self, CountCondition(self, 1), input_folder=app_input_path, name="study_loader_op"
        )
        series_selector_op = _timed(DICOMSeriesSelectorOperator)(self, rules=RULES, name="series_selector_op")
        series_to_vol_op = _timed(DICOMSeriesToVolumeOperator)(self, name="series_to_vol_op")
        config_names = BundleConfigNames(config_names=["inference"])
        bundle_spleen_seg_op = TimedBundleOp(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=config_names,
            name="bundle_spleen_seg_op",
        )
        segment_descriptions = [
            SegmentDescription(
                segment_label="Spleen",
                segmented_property_category=codes.SCT.Organ,
                segmented_property_type=codes.SCT.Spleen,
                algorithm_name="volumetric (3D) segmentation of the spleen from CT image",
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version="0.3.2",
            )
        ]
        custom_tags = {"SeriesDescription": "AI generated Seg, not for clinical use."}
        dicom_seg_writer = _timed(DICOMSegmentationWriterOperator)(
            self,
            segment_descriptions=segment_descriptions,
            custom_tags=custom_tags,
            output_folder=app_output_path,
            name="dicom_seg_writer",
        )
        self.add_flow(study_loader_op, series_selector_op, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(
            series_selector_op, series_to_vol_op, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(series_to_vol_op, bundle_spleen_seg_op, {("image", "image")})
        self.add_flow(bundle_spleen_seg_op, dicom_seg_writer, {("pred", "seg_image")})
        self.add_flow(
            series_selector_op, dicom_seg_writer, {("study_selected_series_list", "study_selected_series_list")}
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    AISpleenSegApp().run()
    TIMINGS["application_run_s"] = time.perf_counter() - t0
    TIMINGS["in_process_total_s"] = time.perf_counter() - T_START
    TIMINGS["torch_threads"] = __import__("torch").get_num_threads()
    text = json.dumps(TIMINGS, indent=2)
    print(text)
    if TIMINGS_PATH is not None:
        TIMINGS_PATH.parent.mkdir(parents=True, exist_ok=True)
        TIMINGS_PATH.write_text(text + "\n")
    sys.stdout.flush()
