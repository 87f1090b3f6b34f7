"""The CT-RATE naming rules of fvlm_core.data.layout: volume stems, scan ids, folder paths, splits."""

from pathlib import Path

from fvlm_core.data.layout import SPLITS, scan_id_of, volume_relpath, volume_stem


def test_volume_names_paths_and_scans():
    assert volume_stem("x/valid_12_a_2.nii.gz") == "valid_12_a_2"
    assert scan_id_of("valid_12_a_2.nii.gz") == "valid_12_a"
    assert scan_id_of("train_1_a_1") == "train_1_a"
    assert scan_id_of("phantom7") == "phantom7"  # not a CT-RATE name: its own scan
    assert volume_relpath("train_1_a_1") == Path("train_1/train_1_a/train_1_a_1.nii.gz")
    assert volume_relpath("valid_3_b_2.nii.gz") == Path("valid_3/valid_3_b/valid_3_b_2.nii.gz")
    assert volume_relpath("case") == Path("case.nii.gz")
    assert SPLITS["valid"] == ("valid", "validation", "valid")
