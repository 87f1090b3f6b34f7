"""Anatomy catalogs: contents, colours, SNOMED codes, and merging TotalSegmentator label maps."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fvlm_core.anatomy import (
    CTRATE_CATALOG,
    EXTENDED_CATALOG,
    AnatomyCatalog,
    get_catalog,
    load_class_map,
)
from fvlm_core.errors import ConfigError, InputError
from fvlm_core.segmentation.labelmap import merge_labels
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP, snomed_classes

#: anatomies allowed to have no SNOMED CT code (none today; add with a reason).
SNOMED_EXCEPTIONS: set[str] = set()
#: anatomies whose classes are not in TotalSegmentator v2's "total" task: pulmonary_artery comes
#: from its "heartchambers_highres" task or from TotalSegmentator v1 outputs.
NOT_IN_TOTAL_V2 = {"pulmonary_artery"}


def test_ctrate_catalog_matches_public_release_order():
    assert CTRATE_CATALOG.names == ["lung", "heart", "esophagus", "aorta"]
    assert [CTRATE_CATALOG.label(n) for n in CTRATE_CATALOG.names] == [1, 2, 3, 4]
    assert set(CTRATE_CATALOG["lung"].ts_classes) >= {
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    }
    assert set(CTRATE_CATALOG["heart"].ts_classes) == {"heart", "atrial_appendage_left"}


def test_extended_catalog_size_colours_and_snomed():
    assert len(EXTENDED_CATALOG) >= 15
    assert EXTENDED_CATALOG.names[:4] == CTRATE_CATALOG.names  # same values for the CT-RATE four
    for needed in (
        "liver",
        "kidney",
        "spleen",
        "pancreas",
        "stomach",
        "small_bowel",
        "colon",
        "urinary_bladder",
    ):
        assert needed in EXTENDED_CATALOG
    for needed in ("gallbladder", "trachea", "pulmonary_artery", "bone"):
        assert needed in EXTENDED_CATALOG
    colours = [a.color for a in EXTENDED_CATALOG]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    assert len(set(colours)) == len(colours), "two anatomies share a display colour"
    for a in EXTENDED_CATALOG:
        if a.name in SNOMED_EXCEPTIONS:
            continue
        assert a.snomed is not None, f"{a.name} has no SNOMED CT code"
        code, meaning = a.snomed
        assert re.fullmatch(r"\d{6,18}", code), (a.name, code)
        assert meaning


def test_snomed_codes_agree_with_totalsegmentator_terminology():
    """Each anatomy that is one TotalSegmentator structure carries the code TotalSegmentator gives it."""
    pytest.importorskip("totalsegmentator", reason="needs the totalsegmentator package")
    # the mapping the installed TotalSegmentator writes into its DICOM SEGs, as the library reads it
    types = {structure: codes[0] for codes, structure in snomed_classes().items()}
    named = [a for a in EXTENDED_CATALOG if a.name in types]
    assert len(named) == 17, [a.name for a in named]  # all but lung (its lobes) and bone (its bones)
    for anatomy in named:
        assert anatomy.snomed[0] == types[anatomy.name], anatomy.name
    assert EXTENDED_CATALOG["lung"].snomed[0] == "39607008"  # Lung structure
    assert EXTENDED_CATALOG["bone"].snomed[0] == "272673000"  # Bone structure


def test_embedded_class_map_equals_totalsegmentator_file(ts_dir):
    shared = load_class_map(ts_dir / "total_class_map.json")
    assert shared == TOTAL_CLASS_MAP
    assert len(TOTAL_CLASS_MAP) == 117


def test_every_catalog_pattern_names_a_totalsegmentator_class():
    names = set(TOTAL_CLASS_MAP.values())
    for a in EXTENDED_CATALOG:
        matched = [c for c in names if a.matches(c)]
        if a.name in NOT_IN_TOTAL_V2:
            assert not matched
            continue
        assert matched, f"{a.name}: its ts_classes {a.ts_classes} match no TotalSegmentator class"
    # no TotalSegmentator class is claimed by two anatomies
    for cls in names:
        owners = [a.name for a in EXTENDED_CATALOG if a.matches(cls)]
        assert len(owners) <= 1, (cls, owners)


def test_merge_totalsegmentator_labelmap_in_one_call(ts_dir):
    import nibabel as nib

    seg = np.asanyarray(nib.load(str(ts_dir / "example_seg.nii.gz")).dataobj)
    class_map = load_class_map(ts_dir / "total_class_map.json")
    merged = merge_labels(seg, class_map, EXTENDED_CATALOG)
    assert merged.shape == seg.shape and merged.dtype == np.uint8
    by_name = {v: k for k, v in class_map.items()}
    lobes = [by_name[c] for c in CTRATE_CATALOG["lung"].ts_classes if c in by_name]
    assert (merged == EXTENDED_CATALOG.label("lung")).sum() == np.isin(seg, lobes).sum() > 0
    assert (merged == EXTENDED_CATALOG.label("liver")).sum() == (seg == by_name["liver"]).sum() > 0
    kidneys = [by_name[c] for c in ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right")]
    assert (merged == EXTENDED_CATALOG.label("kidney")).sum() == np.isin(seg, kidneys).sum()
    # classes outside the catalog (muscles, spinal cord, IVC) become background
    assert merged[seg == by_name["spinal_cord"]].max() == 0
    assert merged[seg == by_name["autochthon_left"]].max() == 0
    # the CT-RATE catalog keeps only its four anatomies
    ct4 = merge_labels(seg, class_map, CTRATE_CATALOG)
    assert set(np.unique(ct4).tolist()) <= {0, 1, 2, 3, 4}
    assert (ct4 == 4).sum() == (seg == by_name["aorta"]).sum()


def test_merge_rejects_negative_values_and_ignores_unknown_values():
    with pytest.raises(InputError):
        merge_labels(np.array([[-1, 0]]), {1: "heart"}, CTRATE_CATALOG)
    out = merge_labels(np.array([0, 1, 200]), {1: "heart"}, CTRATE_CATALOG)
    assert out.tolist() == [0, 2, 0]


def test_catalog_roundtrip_subset_and_errors():
    again = AnatomyCatalog.from_dict(json.loads(json.dumps(EXTENDED_CATALOG.to_dict())))
    assert again == EXTENDED_CATALOG
    sub = get_catalog(["liver", "lung"])
    assert sub.names == ["liver", "lung"] and sub.label("lung") == 2
    assert get_catalog(["lung", "heart", "esophagus", "aorta"]) is CTRATE_CATALOG
    with pytest.raises(ConfigError, match="not in catalog"):
        CTRATE_CATALOG.label("liver")
    with pytest.raises(ConfigError, match="unknown anatomy catalog"):
        get_catalog("nope")


def test_relabel_maps_source_values_to_catalog_values():
    from fvlm_core.anatomy import CTRATE_CATALOG

    labels = np.array([[0, 1, 2], [3, 4, 9]], dtype=np.uint8)
    # a cache listing (heart, trachea, lung, aorta): trachea is not in the CT-RATE catalog
    out = CTRATE_CATALOG.relabel(labels, ["heart", "trachea", "lung", "aorta"])
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 2, 0], [1, 4, 0]]
    # a {value: name} table (a synthetic phantom's mask values)
    out = CTRATE_CATALOG.relabel(np.array([5, 7, 0]), {7: "lung", 5: "esophagus"})
    assert out.tolist() == [3, 1, 0]
    # already in catalog order: the same array back
    same = np.array([1, 2, 3, 4], dtype=np.uint8)
    assert CTRATE_CATALOG.relabel(same, CTRATE_CATALOG.names) is same
    with pytest.raises(InputError):
        CTRATE_CATALOG.relabel(np.array([-1, 0]), ["lung"])
