"""``fvlm evaluate --protocol reference`` on a CT-RATE layout gives the public eval.py's
probabilities: the whole reference pipeline, written here from the public code with MONAI's
transforms and SimpleITK (``data/fix_data.py``: geometry and HU from the metadata, int16;
``data/resize.py``: the array resized to 1 x 1 x 3 mm; ``data/preprocess.py`` and ``eval.py``:
``spec_prepare`` / ``spec_window`` of test_reference_windows; the model: ``spec_probabilities``),
against the command on the same files and weights. Volumes: the two real abdomen CTs of
``../shared/data`` with their TotalSegmentator lungs and aorta.
"""

from __future__ import annotations

import ast
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import LoadImaged, Resized, Transposed
from test_reference_windows import (
    GROUPS,
    NAMES,
    _relabel,
    small_reference_model,
    spec_prepare,
    spec_probabilities,
    spec_window,
)

from fvlm_core.findings import CTRATE_LABELS

VOLUMES = {
    "valid_1_a_1": ("example_ct", "example_seg_fast_force_split"),
    "valid_2_a_1": ("example_ct_sm", "example_seg"),
}


def _metadata_row(name: str, image: sitk.Image) -> dict[str, str]:
    d = image.GetDirection()
    iop = [d[0], d[3], d[6], d[1], d[4], d[7]]  # the x and y axes' directions
    sx, sy, sz = image.GetSpacing()
    return {
        "VolumeName": f"{name}.nii.gz",
        "XYSpacing": str([sx, sy]),
        "ZSpacing": str(sz),
        "ImagePositionPatient": str(list(image.GetOrigin())),
        "ImageOrientationPatient": str(iop),
        "RescaleSlope": "1.0",
        "RescaleIntercept": "0.0",
    }


def _write_csv(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def layout(ts_dir, tmp_path_factory):
    """A CT-RATE layout (valid split): volumes, metadata, labels, anatomy masks + class map."""
    root = tmp_path_factory.mktemp("ctrate")
    class_map = json.loads((ts_dir / "total_class_map.json").read_text())
    meta, labels = [], []
    for i, (name, (image_name, seg_name)) in enumerate(VOLUMES.items()):
        image = sitk.ReadImage(str(ts_dir / f"{image_name}.nii.gz"))
        seg = sitk.ReadImage(str(ts_dir / f"{seg_name}.nii.gz"))
        rel = f"valid_{i + 1}/valid_{i + 1}_a/{name}.nii.gz"
        for folder, img in (
            ("dataset", sitk.Cast(image, sitk.sitkInt16)),
            ("anatomy_masks", _merged(seg, class_map)),
        ):
            (root / folder / "valid" / rel).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / folder / "valid" / rel))
        meta.append(_metadata_row(name, image))
        labels.append({"VolumeName": f"{name}.nii.gz", **dict.fromkeys(CTRATE_LABELS, i % 2)})
    (root / "anatomy_masks" / "class_map.json").write_text(
        json.dumps({str(i + 1): n for i, n in enumerate(NAMES)})
    )
    _write_csv(root / "metadata" / "validation_metadata.csv", meta)
    _write_csv(root / "multi_abnormality_labels" / "valid_predicted_labels.csv", labels)
    return root


def _merged(seg: sitk.Image, class_map) -> sitk.Image:
    out = sitk.GetImageFromArray(_relabel(sitk.GetArrayFromImage(seg), class_map, GROUPS))
    out.CopyInformation(seg)
    return out


# ---------------------------------------------------------------- the public pipeline, written here
def spec_fix(raw_path, row, out_path) -> None:
    """data/fix_data.py: geometry and rescale from the metadata row, int16."""
    image = sitk.ReadImage(str(raw_path))
    (x, y), z = map(float, ast.literal_eval(row["XYSpacing"])), float(row["ZSpacing"])
    image.SetSpacing((x, y, z))
    image.SetOrigin(ast.literal_eval(row["ImagePositionPatient"]))
    orientation = ast.literal_eval(row["ImageOrientationPatient"])
    row_cosine, col_cosine = orientation[:3], orientation[3:6]
    image.SetDirection(row_cosine + col_cosine + np.cross(row_cosine, col_cosine).tolist())
    adjusted = image * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
    sitk.WriteImage(sitk.Cast(adjusted, sitk.sitkInt16), str(out_path))


def spec_resize(image_path, mask_path):
    """data/resize.py then data/preprocess.py's loader up to the intensity scaling (which
    ``spec_prepare`` applies): ``(hu (Z, Y, X), labels (Z, Y, X))``."""
    data = LoadImaged(keys=["image", "label"], image_only=False, ensure_channel_first=True)(
        {"image": str(image_path), "label": str(mask_path)}
    )
    affine = data["image"].affine
    spacing = (abs(affine[0, 0].item()), abs(affine[1, 1].item()), abs(affine[2, 2].item()))
    _, h, w, d = data["image"].shape
    ref_spacing = (1.0, 1.0, 3.0)
    scale = [spacing[i] / ref_spacing[i] for i in range(3)]
    target_size = [int(h * scale[1]), int(w * scale[0]), int(d * scale[2])]
    data = Resized(spatial_size=target_size, keys=["image"], mode="trilinear")(data)
    data = Resized(spatial_size=target_size, keys=["label"], mode="nearest")(data)
    data = Transposed(keys=["image", "label"], indices=(0, 3, 2, 1))(data)
    return np.asarray(data["image"][0], np.float32), np.asarray(data["label"][0])


# ---------------------------------------------------------------- tests
@pytest.mark.slow
def test_reference_resize_equals_resize_py(layout, tmp_path):
    """The project's eval.py resizing of a CT-RATE volume equals data/fix_data.py + resize.py."""
    from fvlm_core.data.ctrate import CTRATEReader, make_segmenter
    from fvlm_core.io import LabelVolume
    from fvlm_core.preprocess import ModelSpaceConfig, reference_resize

    reader = CTRATEReader(layout, "valid", require_reports=False)
    segment = make_segmenter("labelmap", masks_dir=reader.masks_dir)
    for record in reader.records:
        fixed = tmp_path / f"{record.name}.nii.gz"
        spec_fix(record.path, record.metadata, fixed)
        hu, labels = spec_resize(fixed, record.mask_path)
        ct = reader.read_ct(record)
        ct_r, lab_r = reference_resize(ct, LabelVolume(segment(ct, record), ct.geometry), ModelSpaceConfig())
        assert ct_r.array.shape == hu.shape and ct_r.array.shape != ct.array.shape
        np.testing.assert_allclose(ct_r.array, hu, rtol=0, atol=1e-3)
        assert np.array_equal(lab_r.array, labels.astype(lab_r.array.dtype))


@pytest.mark.slow
def test_evaluate_reference_protocol_gives_the_reference_probabilities(layout, tmp_path):
    """Scores written by ``fvlm evaluate --protocol reference`` equal the public pipeline's
    probabilities (< 1e-4) on the same files and weights; a volume's absent anatomy (heart,
    esophagus) is not scored by either."""
    from fvlm_core.data.ctrate import CTRATEReader
    from fvlm_training.cli import main

    torch.set_num_threads(2)
    model = small_reference_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--data",
        str(layout),
        "--split",
        "valid",
        "--model",
        str(model_dir),
        "--out",
        str(out),
    ]
    assert (
        main([*argv, "--protocol", "reference", "--n-bootstrap", "10", "--no-plots", "--device", "cpu"]) == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["meta"]["windows"] == "reference"
    with open(out / "scores.csv", newline="") as fh:
        scores = {r["VolumeName"]: r for r in csv.DictReader(fh)}

    findings = model.config.finding_set()
    reader = CTRATEReader(layout, "valid", require_reports=False)
    worst, compared = 0.0, 0
    with torch.no_grad():
        for record in reader.records:
            fixed = tmp_path / f"{record.name}.fixed.nii.gz"
            spec_fix(record.path, record.metadata, fixed)
            hu, labels = spec_resize(fixed, record.mask_path)
            image, prepared, _, _ = spec_prepare(hu, labels)
            row = scores[f"{record.name}.nii.gz"]
            for i, name in enumerate(NAMES):
                mine = [f for f in findings if f.anatomy == name]
                if not (prepared == i + 1).any():
                    assert all(row[f.name] == "" for f in mine), (record.name, name)
                    continue
                _, _, win, mask = spec_window(image, prepared, i + 1)
                pairs = [(f.negative[0], f.positive[0]) for f in mine]
                for f, p in zip(mine, spec_probabilities(model, win[None], mask[0], i + 1, pairs)):
                    worst = max(worst, abs(float(row[f.name]) - p))
                    compared += 1
    assert compared == 2 * 12  # lung (11 findings) and aorta (1) in both volumes
    assert worst < 1e-4, worst
