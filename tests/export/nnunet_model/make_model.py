"""Make the committed nnU-Net v2 test model: nnunetv2's own planner, preprocessor and trainer, briefly, on the CPU.

The model beside this script (``trained/``: plans.json, dataset.json, fold_0 and fold_1 checkpoints) is what the
nnU-Net parity tests package and compare against ``nnUNetPredictor``. It is trained for a couple of minutes on
phantom CTs, enough for confident, structured label maps (a network at initialisation gives near-uniform
probabilities, where any two implementations disagree on the argmax); it is a test fixture, not a model of anatomy.

    python -m tests.export.nnunet_model.make_model            # rewrites tests/export/nnunet_model/trained

nnunetv2 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` at import, so they are set (to a
temporary folder) before it is imported. What is changed from nnU-Net's defaults, and why:

* coarse cases (13.5 x 16 x 16 mm) and a narrow network (features 8, 16, 32, 32 ...), so that training and the
  tests run on two busy CPU cores;
* 12 epochs of 40 iterations per fold (nnU-Net: 1000 x 250), without data augmentation;
* the checkpoints keep what inference reads (weights, trainer name, init args, mirroring axes), not the optimiser
  state, to stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DATASET_ID = 988
DATASET_NAME = f"Dataset{DATASET_ID}_PhantomCT"
#: training cases: (z, y, x) voxels at (z, y, x) mm, a 162 x 384 x 384 mm torso block; nnU-Net plans its target
#: spacing from these (the median), so a thin-slice CT is resampled with the separate-z scheme at inference
CASE_SHAPE = (12, 24, 24)
CASE_SPACING = (13.5, 16.0, 16.0)
CASES = 6
FOLDS = (0, 1)
EPOCHS, ITERATIONS = 12, 40
MAX_FEATURES = 32
LABELS = {"background": 0, "lung": 1, "liver": 2, "spleen": 3, "kidney": 4, "bone": 5}
HERE = Path(__file__).resolve().parent
TRAINED = HERE / "trained"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(TRAINED)])[0])
    with tempfile.TemporaryDirectory() as tmp:
        use_folders(Path(tmp))
        folder = _train(Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        copy_trained(folder, out, FOLDS)
    print(f"wrote {out}")
    return 0


def use_folders(tmp: Path) -> None:
    """nnunetv2's raw, preprocessed and results folders in ``tmp`` (it reads them from the environment when it is
    imported, so before), and one process for each of its steps."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(tmp / var)
    os.environ.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="0")


def copy_trained(folder: Path, out: Path, folds: tuple[int, ...]) -> None:
    """A trained-model folder as inference needs it: plans.json, dataset.json and slim fold checkpoints."""
    out.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(folder / name, out / name)
    for fold in folds:
        _slim_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth", out / f"fold_{fold}")


def _write_raw(raw: Path, shape: tuple[int, int, int] = CASE_SHAPE,
               spacing: tuple[float, float, float] = CASE_SPACING, cases: int = CASES,
               name: str = "PhantomCT") -> None:
    """``cases`` phantom CTs of ``shape`` (z, y, x) at ``spacing`` mm with their labels, and dataset.json."""
    import SimpleITK as sitk

    from phantom import make_phantom

    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(cases):
        ph = make_phantom(shape, spacing, rng=100 + i)
        for array, path in ((ph.hu.astype(np.float32), raw / "imagesTr" / f"ph_{i:03d}_0000.nii.gz"),
                            (ph.labels.astype(np.uint8), raw / "labelsTr" / f"ph_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(reversed(spacing)))  # SimpleITK: (x, y, z)
            sitk.WriteImage(image, str(path))
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz",
               "name": name, "description": "phantom CTs (test fixture, not anatomy)"}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=4))


def _train(tmp: Path) -> Path:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiments,
        preprocess,
    )

    torch.set_num_threads(2)
    _write_raw(tmp / "nnUNet_raw" / DATASET_NAME)
    extract_fingerprint_dataset(DATASET_ID, num_processes=1, verbose=False, show_progress_bar=False)
    plans_identifier = plan_experiments([DATASET_ID])
    plans_path = tmp / "nnUNet_preprocessed" / DATASET_NAME / f"{plans_identifier}.json"
    plans = json.loads(plans_path.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(8 * 2**i, MAX_FEATURES) for i in range(len(arch["features_per_stage"]))]
    plans_path.write_text(json.dumps(plans, indent=4))
    preprocess([DATASET_ID], plans_identifier, configurations=("3d_fullres",), num_processes=(1,),
               verbose=False, show_progress_bar=False)
    dataset_json = json.loads((tmp / "nnUNet_preprocessed" / DATASET_NAME / "dataset.json").read_text())
    BriefTrainer = brief_trainer(EPOCHS, ITERATIONS)  # noqa: N806 - a class
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (the planner above needs >= 1)
    for fold in FOLDS:
        torch.manual_seed(fold)
        # as run_training's get_trainer_from_args (the trainer pops it)
        trainer = BriefTrainer({**plans, "continue_training": False}, "3d_fullres", fold, dataset_json,
                               torch.device("cpu"))
        trainer.run_training()
    return Path(trainer.output_folder_base)


def brief_trainer(epochs: int, iterations: int) -> type:
    """nnU-Net's trainer, ``epochs`` x ``iterations`` long, without spatial and intensity augmentation (as
    nnU-Net's nnUNetTrainerNoDA; mirroring stays allowed at inference). nnunetv2 is imported here: it reads its
    folders from the environment at import."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

    class BriefTrainer(nnUNetTrainer):
        """Its __init__ reads its own signature: spelled out."""

        get_training_transforms = staticmethod(nnUNetTrainerNoDA.get_training_transforms)

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: ANN202, N802
            # patches of the final size (no spatial transform crops them); mirroring axes as nnU-Net plans them
            rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            return rotation, dummy_2d, self.configuration_manager.patch_size, mirror_axes

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):  # noqa: B008 - nnU-Net's own signature
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epochs, iterations, 2

    return BriefTrainer


def _slim_checkpoint(src: Path, fold_dir: Path) -> None:
    """What ``nnUNetPredictor`` reads; the trainer name becomes ``nnUNetTrainer`` (the brief trainer builds the same
    network, and nnU-Net finds its trainer class by that name)."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    keep = {k: ckpt[k] for k in ("network_weights", "init_args", "inference_allowed_mirroring_axes", "current_epoch")}
    keep["trainer_name"] = "nnUNetTrainer"
    fold_dir.mkdir(parents=True)
    torch.save(keep, fold_dir / "checkpoint_final.pth")


if __name__ == "__main__":
    raise SystemExit(main())
