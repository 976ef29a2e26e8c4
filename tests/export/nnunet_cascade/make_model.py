"""Make the committed nnU-Net v2 cascade test model: ``3d_lowres`` -> ``3d_cascade_fullres``, trained by nnunetv2's
own trainer, briefly, on phantom CTs, on the CPU.

The folder beside this script (``Dataset987_PhantomCascade/``) is laid out as nnU-Net's results folder is: one
trained-model folder per configuration, ``nnUNetTrainer__nnUNetPlans__3d_lowres`` and
``nnUNetTrainer__nnUNetPlans__3d_cascade_fullres``, each with plans.json, dataset.json and the fold_0 and fold_1
checkpoints. The cascade parity tests package the second and compare it with ``nnUNetPredictor``'s cascade. It is
a test fixture, not a model of anatomy.

    python -m tests.export.nnunet_cascade.make_model     # rewrites tests/export/nnunet_cascade/Dataset987_...

nnunetv2 plans a lowres stage only when the cases are large against the patch, so the plans are written here
(nnU-Net allows custom plans) from what its planner gives for ``3d_fullres``:

* ``3d_lowres``: twice the spacing, half the patch, ``next_stage`` the cascade (the mapping must be bijective for
  nnU-Net's trainer to write the next stage's inputs);
* ``3d_cascade_fullres``: inherits ``3d_fullres``, ``previous_stage`` ``3d_lowres``, as nnU-Net's planner writes it;
* both: a narrow three-stage network (features 6, 12, 24) so that the four checkpoints stay small.

The lowres stage is trained on both folds first, and its validation writes each case's segmentation resampled to
the cascade's spacing (``predicted_next_stage``), which is what the cascade is trained on, as in nnU-Net itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.export.nnunet_model.make_model import _write_raw, brief_trainer, copy_trained, use_folders

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_PhantomCascade"
#: training cases (z, y, x): a 240 x 360 x 360 mm torso block
CASE_SHAPE = (20, 40, 40)
CASE_SPACING = (12.0, 9.0, 9.0)
CASES = 6
FOLDS = (0, 1)
EPOCHS, ITERATIONS = 10, 30
FEATURES = [6, 12, 24]
FULLRES_PATCH = [16, 32, 32]
LOWRES_PATCH = [8, 16, 16]
HERE = Path(__file__).resolve().parent
TRAINED = HERE / DATASET_NAME
CONFIGURATIONS = ("3d_lowres", "3d_cascade_fullres")


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(TRAINED)])[0])
    with tempfile.TemporaryDirectory() as tmp:
        use_folders(Path(tmp))
        folders = _train(Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        for configuration, folder in zip(CONFIGURATIONS, folders, strict=True):
            copy_trained(folder, out / f"nnUNetTrainer__nnUNetPlans__{configuration}", FOLDS)
    print(f"wrote {out}")
    return 0


def cascade_plans(plans: dict) -> dict:
    """nnU-Net's plans with a lowres stage and the cascade beside ``3d_fullres`` (narrow networks, fixed patches)."""
    configs = plans["configurations"]
    fullres = configs["3d_fullres"]
    arch = fullres["architecture"]["arch_kwargs"]
    arch.update(n_stages=3, features_per_stage=FEATURES, kernel_sizes=[[3, 3, 3]] * 3,
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2])
    fullres.update(patch_size=FULLRES_PATCH, batch_size=2)
    lowres = json.loads(json.dumps(fullres))
    lowres.update(data_identifier="nnUNetPlans_3d_lowres", patch_size=LOWRES_PATCH,
                  spacing=[2 * s for s in fullres["spacing"]], next_stage=["3d_cascade_fullres"],
                  median_image_size_in_voxels=[round(s / 2) for s in fullres["median_image_size_in_voxels"]])
    configs["3d_lowres"] = lowres
    configs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    configs.pop("2d", None)
    return plans


def _train(tmp: Path) -> list[Path]:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiments,
        preprocess,
    )

    torch.set_num_threads(2)
    _write_raw(tmp / "nnUNet_raw" / DATASET_NAME, CASE_SHAPE, CASE_SPACING, CASES, name="PhantomCascade")
    extract_fingerprint_dataset(DATASET_ID, num_processes=1, verbose=False, show_progress_bar=False)
    plans_identifier = plan_experiments([DATASET_ID])
    preprocessed = tmp / "nnUNet_preprocessed" / DATASET_NAME
    plans_path = preprocessed / f"{plans_identifier}.json"
    plans = cascade_plans(json.loads(plans_path.read_text()))
    plans_path.write_text(json.dumps(plans, indent=4))
    preprocess([DATASET_ID], plans_identifier, configurations=("3d_fullres", "3d_lowres"), num_processes=(1, 1),
               verbose=False, show_progress_bar=False)
    cases = [f"ph_{i:03d}" for i in range(CASES)]
    half = len(cases) // 2
    splits = [{"train": cases[half:], "val": cases[:half]}, {"train": cases[:half], "val": cases[half:]}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=4))
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    BriefTrainer = brief_trainer(EPOCHS, ITERATIONS)  # noqa: N806 - a class
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (the planner above needs >= 1)
    folders = []
    for configuration in CONFIGURATIONS:
        for fold in FOLDS:
            torch.manual_seed(fold)
            trainer = BriefTrainer({**plans, "continue_training": False}, configuration, fold, dataset_json,
                                   torch.device("cpu"))
            trainer.run_training()
            if configuration == "3d_lowres":  # writes predicted_next_stage for this fold's validation cases
                trainer.perform_actual_validation(False)
        folders.append(Path(trainer.output_folder_base))
    return folders


if __name__ == "__main__":
    raise SystemExit(main())
