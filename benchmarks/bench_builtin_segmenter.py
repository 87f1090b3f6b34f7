"""Dice of the built-in segmenter against TotalSegmentator reference label maps, and its speed.

Usage::

    python3 benchmarks/bench_builtin_segmenter.py [--data ../shared/data/ct/totalsegmentator]

Prints one row per (case, structure): Dice, volumes, CPU seconds; then the chest CT's lung
volumes and their overlap with the reference heart mask.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path

import numpy as np

from fvlm_core.io import read_ct, read_label_map
from fvlm_core.segmentation import TOTAL_CLASS_MAP, segment_masks

BONE_PATTERNS = ("vertebrae_*", "rib_*", "sternum", "sacrum", "hip_*", "femur_*", "humerus_*", "scapula_*")
BONE_PATTERNS += ("clavicula_*", "skull")
BONE = [v for v, c in TOTAL_CLASS_MAP.items() if any(fnmatch.fnmatchcase(c, p) for p in BONE_PATTERNS)]
REFS = {
    "lungs": [10, 11, 12, 13, 14],
    "lung_left": [10, 11],
    "lung_right": [12, 13, 14],
    "bone": BONE,
    "bone+costal_cartilages": [*BONE, 117],
}
CASES = (
    ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    ("example_ct_dicom", "example_seg_dicom.nii.gz"),
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "totalsegmentator"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default)
    args = parser.parse_args()
    print(f"{'case':24s} {'structure':24s} {'dice':>6s} {'ours_ml':>9s} {'ref_ml':>9s} {'cpu_s':>6s}")
    for ct_name, seg_name in CASES:
        ct = read_ct(args.data / ct_name)
        ref = read_label_map(args.data / seg_name, reference=ct.geometry).array
        t0 = time.process_time()
        m = segment_masks(ct.array, ct.geometry)
        cpu = time.process_time() - t0
        ours = {
            "lungs": m["lung_left"] | m["lung_right"],
            "lung_left": m["lung_left"],
            "lung_right": m["lung_right"],
            "bone": m["bone"],
            "bone+costal_cartilages": m["bone"],
        }
        vml = ct.geometry.voxel_volume_ml
        for key, values in REFS.items():
            r = np.isin(ref, values)
            if not r.any():
                continue
            o = ours[key]
            print(
                f"{ct_name:24s} {key:24s} {dice(o, r):6.3f} {o.sum() * vml:9.1f} {r.sum() * vml:9.1f} {cpu:6.2f}"
            )
    ct = read_ct(args.data / "chest_ct.nii.gz")
    heart = read_label_map(args.data / "chest_heart.nii.gz", reference=ct.geometry).array > 0
    t0 = time.process_time()
    m = segment_masks(ct.array, ct.geometry)
    cpu = time.process_time() - t0
    vml = ct.geometry.voxel_volume_ml
    for side in ("lung_left", "lung_right"):
        n = np.count_nonzero(m[side])
        print(
            f"chest_ct {side}: {n * vml / 1000:.2f} l, overlap with heart {np.count_nonzero(m[side] & heart) / n:.4%}"
        )
    print(f"chest_ct airways removed: {np.count_nonzero(m['airways']) * vml:.1f} ml; cpu {cpu:.2f} s")
    print(
        f"chest_ct bone {np.count_nonzero(m['bone']) * vml:.0f} ml, in heart mask {np.count_nonzero(m['bone'] & heart) * vml:.1f} ml"
    )


if __name__ == "__main__":
    main()
