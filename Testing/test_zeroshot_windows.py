"""Window planning on plain label arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm_core.zeroshot import windows as W

NAMES = ["lung", "heart", "esophagus", "aorta"]


def _box_labels(shape, boxes):
    lab = np.zeros(shape, np.uint8)
    for value, (lo, hi) in boxes.items():
        lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return lab


def test_boxes_one_pass():
    lab = _box_labels((20, 30, 40), {1: ((2, 3, 4), (10, 12, 20)), 3: ((15, 0, 0), (16, 1, 2))})
    boxes = W.anatomy_boxes(lab, NAMES)
    assert boxes == {"lung": ((2, 3, 4), (10, 12, 20)), "esophagus": ((15, 0, 0), (16, 1, 2))}
    assert W.voxel_counts(lab, 4).tolist() == [8 * 9 * 16, 0, 2, 0]


def test_shared_window_covers_all_anatomies_that_fit():
    lab = _box_labels(
        (24, 24, 24),
        {1: ((2, 2, 2), (12, 12, 12)), 2: ((10, 10, 10), (14, 14, 14)), 4: ((4, 14, 4), (8, 18, 8))},
    )
    plans, dropped = W.plan_windows(lab, NAMES, window_zyx=(16, 16, 16), multiple_zyx=(4, 4, 8))
    assert dropped == {}
    assert len(plans) == 1
    (plan,) = plans
    assert plan.anatomies == ("lung", "heart", "aorta")  # catalog order, esophagus absent
    assert plan.size_zyx == (16, 16, 16)
    boxes = W.anatomy_boxes(lab, NAMES)
    assert all(plan.contains(boxes[n]) for n in plan.anatomies)


def test_large_volume_gets_windows_each_anatomy_fits_in():
    # two anatomies 60 voxels apart along x: no single 16^3 window holds both
    lab = _box_labels((16, 16, 80), {1: ((2, 2, 2), (10, 10, 10)), 2: ((4, 4, 66), (12, 12, 74))})
    plans, _ = W.plan_windows(lab, NAMES, window_zyx=(16, 16, 16), multiple_zyx=(4, 4, 8))
    assert len(plans) == 2
    boxes = W.anatomy_boxes(lab, NAMES)
    for plan in plans:
        assert plan.size_zyx == (16, 16, 16)
        assert all(plan.contains(boxes[n]) for n in plan.anatomies)
    assert sorted(a for p in plans for a in p.anatomies) == ["heart", "lung"]


def test_anatomy_larger_than_window_gets_a_grown_window():
    lab = _box_labels((16, 16, 64), {1: ((2, 2, 1), (10, 10, 43)), 2: ((3, 3, 20), (6, 6, 30))})
    plans, _ = W.plan_windows(lab, NAMES, window_zyx=(16, 16, 16), multiple_zyx=(4, 4, 8))
    assert len(plans) == 1  # heart fits inside the lung's grown window
    assert plans[0].size_zyx == (16, 16, 48)  # extent 42 rounded up to a multiple of 8
    assert plans[0].contains(((2, 2, 1), (10, 10, 43)))


def test_centred_one_window_per_anatomy_min_size():
    lab = _box_labels((40, 40, 40), {1: ((2, 2, 2), (12, 12, 12)), 2: ((10, 10, 10), (34, 14, 14))})
    plans = W.plan_centred(W.anatomy_boxes(lab, NAMES), (4, 4, 8), min_size_zyx=(12, 16, 16), order=NAMES)
    assert [p.anatomies for p in plans] == [("lung",), ("heart",)]
    assert plans[0].size_zyx == (12, 16, 16)
    assert plans[1].size_zyx == (24, 16, 16)  # extent 24 along z exceeds the minimum 12
    # centred: the box z 10..34 fills the window exactly; y/x box centre 12 is the window centre
    assert plans[1].start_zyx == (10, 4, 4)


def test_capped_window_drops_anatomy_under_90_percent():
    # a cap smaller than the lung's extent cuts it: 20 of 40 slices inside -> not scored
    lab = _box_labels((48, 16, 16), {1: ((4, 2, 2), (44, 10, 10)), 2: ((2, 2, 11), (6, 6, 15))})
    plans, dropped = W.plan_windows(
        lab,
        NAMES,
        window_zyx=(8, 8, 8),
        multiple_zyx=(4, 4, 8),
        strategy="centred",
        max_size_zyx=(20, 16, 16),
    )
    assert list(dropped) == ["lung"] and dropped["lung"] == pytest.approx(20 / 40)
    assert [p.anatomies for p in plans] == [("heart",)]
    # without the cap nothing is dropped (the window grows to the extent)
    plans, dropped = W.plan_windows(lab, NAMES, (8, 8, 8), (4, 4, 8), strategy="centred")
    assert dropped == {} and [p.anatomies for p in plans] == [("lung",), ("heart",)]


def test_reference_windows_drop_nothing_and_refuse_a_cap():
    """eval.py's window of an anatomy larger than the window keeps (nearly) all of it, and its
    90% rule exempts the target: every anatomy present gets its window."""
    lab = _box_labels((48, 16, 16), {1: ((4, 2, 2), (44, 10, 10)), 2: ((2, 2, 11), (6, 6, 15))})
    plans, dropped = W.plan_windows(lab, NAMES, (8, 8, 8), (4, 4, 8), strategy="reference")
    assert dropped == {} and [p.anatomies for p in plans] == [("lung",), ("heart",)]
    lung = plans[0]
    assert lung.data_size_zyx == (39, 8, 8) and lung.size_zyx == (40, 8, 8)  # 44 - 4 - 1, padded to 4s
    with pytest.raises(ValueError, match="no size cap"):
        W.plan_windows(lab, NAMES, (8, 8, 8), (4, 4, 8), strategy="reference", max_size_zyx=(20, 16, 16))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        W.plan_windows(np.zeros((4, 4, 4), np.uint8), NAMES, (4, 4, 4), (4, 4, 4), strategy="nope")


def test_plan_centre_reproduces_its_start_in_crop_window():
    from fvlm_core.geometry import Geometry
    from fvlm_core.io import CTVolume
    from fvlm_core.preprocess import crop_window

    g = Geometry((40, 30, 20), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    ct = CTVolume(np.zeros(g.shape_zyx, np.float32), g)
    for start, size in (((-3, 5, 7), (16, 16, 16)), ((2, -9, 0), (8, 24, 32)), ((0, 0, 0), (20, 30, 40))):
        plan = W.WindowPlan(start, size, ("lung",))
        win = crop_window(ct, None, plan.center_zyx, plan.size_zyx)
        assert win.start_zyx == start and win.hu.shape == size
