"""Build a TotalSegmentator weights folder with random weights: ``python totalseg_weights.py HOME``.

``HOME`` becomes a ``TOTALSEG_HOME_DIR``: ``HOME/nnunet/results/<DatasetXXX_...>/<trainer>__nnUNetPlans__3d_fullres/``
with ``dataset.json``, ``plans.json`` and ``fold_0/checkpoint_final.pth``, for the datasets the
"total" task's ``--fast`` run with a ``roi_subset`` loads: 297 (3 mm model) and 298 (6 mm model
that crops to the subset). Folder and trainer names are TotalSegmentator's own (its
``map_tasks_config``); nothing here imitates a file format:

* ``dataset.json``: nnU-Net v2's format with TotalSegmentator's 117 "total" label names;
* ``plans.json``: nnU-Net's ``ExperimentPlanner`` run on a tiny generated dataset (two 24^3
  volumes at the model's spacing), with a U-Net of 4 base features and one convolution per stage
  so that the test runs in CI time on 2 CPU cores;
* ``checkpoint_final.pth``: written by nnU-Net's trainer (``nnUNetTrainer.save_checkpoint``) for
  the network it builds from those plans, with nnU-Net's random initialisation (seeded).

A separate script (not run inside pytest) because nnU-Net's planner starts ``spawn`` workers,
which re-import the main module.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np

#: dataset id -> voxel spacing (mm) of its model.
DATASETS = {297: 3.0, 298: 6.0}


def write_raw_dataset(raw: Path, labels: dict[str, int], spacing: float, seed: int) -> None:
    """Two 24^3 CT-like volumes with random labels over all classes, nnU-Net v2 raw layout."""
    rng = np.random.default_rng(seed)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    for i in range(2):
        image = rng.normal(0.0, 300.0, (24, 24, 24)).astype(np.float32)
        seg = rng.integers(0, len(labels), (24, 24, 24)).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), raw / "labelsTr" / f"case{i}.nii.gz")
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=1))


def plan(dataset_id: int) -> None:
    """nnU-Net's fingerprint extraction and default experiment planner, with a tiny U-Net."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiment_dataset,
    )

    class TinyPlanner(ExperimentPlanner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 4
            self.UNet_blocks_per_stage_encoder = (1,) * 14
            self.UNet_blocks_per_stage_decoder = (1,) * 13

    with _fork_workers():
        extract_fingerprints([dataset_id], num_processes=1)
    plan_experiment_dataset(dataset_id, TinyPlanner)


@contextlib.contextmanager
def _fork_workers():
    """nnU-Net's fingerprint extraction analyses the cases in a ``spawn`` pool: its worker
    re-imports nnU-Net and torch (seconds per dataset). Here the worker is forked instead (same
    code, same results; the process has run no torch or ITK threads yet: see :func:`main`)."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor

    real = fingerprint_extractor.multiprocessing
    fingerprint_extractor.multiprocessing = types.SimpleNamespace(
        get_context=lambda method: multiprocessing.get_context("fork")
    )
    try:
        yield
    finally:
        fingerprint_extractor.multiprocessing = real


def save_random_checkpoint(dataset_id: int, trainer_name: str) -> Path:
    """nnU-Net's trainer builds the planned network (random init) and saves its final checkpoint."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    torch.manual_seed(dataset_id)
    trainer = get_trainer_from_args(
        str(dataset_id), "3d_fullres", 0, trainer_name, device=torch.device("cpu")
    )
    # what nnUNetTrainer.initialize() does, without the preprocessed training data it also looks up
    cm = trainer.configuration_manager
    heads = trainer.label_manager.num_segmentation_heads
    inputs = determine_num_input_channels(trainer.plans_manager, cm, trainer.dataset_json)
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:  # nnU-Net >= 2.7
        arch = (trainer.plans_manager, cm)
    else:
        arch = (
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
        )
    trainer.network = trainer.build_network_architecture(
        *arch, inputs, heads, trainer.enable_deep_supervision
    )
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    # as nnUNetTrainer.on_train_start: the files inference restores the network from
    base = Path(trainer.output_folder_base)
    (base / "plans.json").write_text(json.dumps(trainer.plans_manager.plans, indent=4))
    (base / "dataset.json").write_text(json.dumps(trainer.dataset_json, indent=4))
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    trainer.save_checkpoint(str(checkpoint))
    return checkpoint


def main(home: Path) -> dict:
    results = home / "nnunet" / "results"
    work = home / "nnunet_build"
    os.environ.update(
        nnUNet_raw=str(work / "raw"),
        nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(results),
    )
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0, **{name: value for value, name in class_map["total"].items()}}
    # python_api runs the 6 mm crop model with this trainer; the 3 mm model's comes from its task config
    trainers = {
        297: TASK_CONFIGS["total"]["sub_modes"]["fast"]["trainer"],
        298: "nnUNetTrainer_4000epochs_NoMirroring",
    }
    for dataset_id, spacing in DATASETS.items():  # every plan first: its workers fork before torch runs
        folder = TASK_ID_WEIGHTS_CONFIGS[dataset_id]["foldername"]
        write_raw_dataset(work / "raw" / folder, labels, spacing, seed=dataset_id)
        plan(dataset_id)
    built = {}
    for dataset_id in DATASETS:
        built[dataset_id] = str(save_random_checkpoint(dataset_id, trainers[dataset_id]).relative_to(home))
    shutil.rmtree(work)  # only the weights folder stays, as after totalseg_download_weights
    return built


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
