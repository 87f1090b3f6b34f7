"""Similarity maps on the CT grid: the one-pass computation equals resampling every map whole.

``similarity.maps_to_ct`` interpolates the token grid itself at warped coordinates (separable
matrices on axis-aligned grids, ``grid_sample`` on oblique ones), for all maps of a window at once
and only on the CT voxels near the non-zero tokens. The rule it must keep is the plain one, run
here through ITK: each map expanded to the window's voxels and the whole window resampled
linearly by physical position (``ModelSpaceWindow.to_original``), 0 outside.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_core.geometry import Geometry
from fvlm_core.preprocess import ModelSpaceWindow
from fvlm_core.zeroshot import similarity

GRID, PATCH = (4, 5, 6), (2, 3, 2)


def _rotation(angle_deg: float) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return tuple(float(x) for x in r.reshape(-1))


def _window() -> ModelSpaceWindow:
    shape = tuple(g * p for g, p in zip(GRID, PATCH))
    geometry = Geometry(
        size=shape[::-1], spacing=(1.5, 1.2, 2.0), origin=(-20.0, -15.0, 5.0), direction=_rotation(0.0)
    )
    return ModelSpaceWindow(hu=np.zeros(shape, np.float32), labels=None, geometry=geometry)


def _whole_window_maps(window, values: np.ndarray, ct: Geometry) -> list[np.ndarray]:
    """The plain rule: every map expanded to voxels and the whole window resampled."""
    return [
        window.to_original(similarity.tokens_to_voxels(v, GRID, PATCH), ct, is_label=False) for v in values
    ]


@pytest.mark.parametrize(
    "ct",
    [
        # an oblique CT grid, finer than the window, larger than it on every side
        Geometry(
            size=(40, 36, 30), spacing=(0.9, 1.1, 1.3), origin=(-30.0, -25.0, 0.0), direction=_rotation(17.0)
        ),
        # axis-aligned grids (the usual case: the model space is the CT reoriented), the separable path
        Geometry(
            size=(40, 36, 30), spacing=(0.9, 1.1, 1.3), origin=(-30.0, -25.0, 0.0), direction=_rotation(0.0)
        ),
        # axes swapped and flipped, a cut through the window
        Geometry(
            size=(30, 40, 12),
            spacing=(1.1, 0.7, 2.5),
            origin=(12.0, -20.0, 30.0),
            direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        ),
        # an oblique CT grid that cuts the window (the window reaches past the scan)
        Geometry(
            size=(12, 30, 9), spacing=(1.0, 1.0, 2.5), origin=(-18.0, -20.0, 8.0), direction=_rotation(-5.0)
        ),
    ],
    ids=["oblique", "aligned", "permuted-flipped-cut", "oblique-cut"],
)
def test_one_pass_maps_equal_whole_window_resampling(ct):
    rng = np.random.default_rng(0)
    values = np.zeros((4, *GRID), np.float32)
    values[0, 1:3, 2:4, 1:3] = rng.uniform(0.1, 1.0, (2, 2, 2))  # inside the window
    values[1, 0, 0:2, 4:6] = rng.uniform(0.1, 1.0, (2, 2))  # touching the window's edges
    values[2, 2, 3, 2] = 0.7  # one token
    values[3] = rng.uniform(0.1, 1.0, GRID)  # the whole window
    values = values.reshape(4, -1)
    window = _window()

    got = similarity.maps_to_ct(window, torch.from_numpy(values), GRID, PATCH, ct)
    want = _whole_window_maps(window, values, ct)

    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.shape == ct.shape_zyx and g.dtype == np.float32
        assert np.abs(w).max() > 0.05  # the map reaches this CT grid
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def test_all_zero_or_disjoint_maps_are_zero():
    window = _window()
    ct = Geometry(
        size=(10, 10, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=_rotation(0.0)
    )
    zero = similarity.maps_to_ct(window, np.zeros((2, int(np.prod(GRID))), np.float32), GRID, PATCH, ct)
    assert [m.shape for m in zero] == [ct.shape_zyx] * 2 and not any(m.any() for m in zero)
    far = Geometry(
        size=(5, 5, 5), spacing=(1.0, 1.0, 1.0), origin=(500.0, 500.0, 500.0), direction=_rotation(0.0)
    )
    ones = similarity.maps_to_ct(window, np.ones((1, int(np.prod(GRID))), np.float32), GRID, PATCH, far)
    assert not ones[0].any()


def test_maps_of_findings_named_alike_get_distinct_files_and_alike_findings_are_refused(tmp_path):
    """ "Lung mass" and "lung mass!" (or "Emphysema" and "emphysema") used to write one file,
    both JSON entries pointing at it. A finding set refuses such names (case, spaces and
    punctuation aside they are one name); were maps named alike anyway, each gets its own file."""
    import SimpleITK as sitk

    from fvlm_core.errors import ConfigError
    from fvlm_core.findings import Finding, FindingSet
    from fvlm_core.io import read_image
    from fvlm_core.zeroshot.prompt_files import merge_findings
    from fvlm_core.zeroshot.results import AnalysisResult, AnatomyMap

    geometry = Geometry(
        size=(4, 3, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=_rotation(0.0)
    )
    keys = [("lung", "Lung mass"), ("lung", "lung mass!"), ("lung", "Emphysema"), ("lung", "emphysema")]
    arrays = {k: np.full((2, 3, 4), i + 1, np.float32) for i, k in enumerate(keys)}
    arrays[("heart", "Lung mass")] = np.full((2, 3, 4), 9, np.float32)  # another anatomy: its own name
    maps = {k: AnatomyMap.from_full(a) for k, a in arrays.items()}
    result = AnalysisResult(anatomies=[], similarity_maps=maps, geometry=geometry)
    written = result.write_maps(tmp_path)
    assert len({p.name for p in written.values()}) == len(maps) == len(list(tmp_path.iterdir()))
    assert written[("heart", "Lung mass")].name == "heart__lung_mass.nii.gz"  # unchanged where unique
    for key, path in written.items():
        assert sitk.GetArrayFromImage(read_image(path)).max() == arrays[key].max()  # its own map
    files = [m["file"] for m in result.to_dict()["similarity_maps"]]
    assert len(set(files)) == len(files)
    again = AnalysisResult(anatomies=[], similarity_maps=maps, geometry=geometry).write_maps(tmp_path / "b")
    assert {k: p.name for k, p in again.items()} == {k: p.name for k, p in written.items()}  # stable

    with pytest.raises(ConfigError, match=r"named alike: 'Lung mass' and 'lung mass!'"):
        FindingSet([Finding.from_name("Lung mass", "lung"), Finding.from_name("lung mass!", "lung")])
    model = FindingSet()
    with pytest.raises(ConfigError, match=r"'emphysema' \(the model's 'Emphysema'\) differ .* only in case"):
        merge_findings(model, FindingSet([Finding.from_name("emphysema", "lung")]))
