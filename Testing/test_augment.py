"""Training augmentation through MONAI's transforms (``fvlm_core.data.samples``), held to the
hand-written crop, pad and flip it replaced.

The random draws differ by construction: MONAI's transforms draw from their own
``numpy.random.RandomState`` (seeded here from two draws of the sample's generator), the replaced
code drew from the ``numpy.random.Generator`` itself, so a given ``(seed, epoch, position)`` now
gets another crop than before. What is the same: for the same draws (crop start, pad offset,
flips) the arrays are equal bit for bit, and the draws have the same distributions (uniform crop
starts and pad offsets, independent flips with ``flip_prob``). One difference: with
``random_crop: false``, MONAI's centre (``CenterSpatialCropd``) starts at ``dim // 2 - crop // 2``,
the replaced rule at ``(dim - crop) // 2``; they differ only for an odd crop size on an axis of
even length (the model windows are multiples of the patch size, even in every bundled config).
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRange

from fvlm_core.data.samples import AugmentConfig, crop_flip, hu_scaling
from fvlm_core.preprocess import window_hu


def _hand_written_crop_flip(hu, labels, cfg, num_anatomies, rng):
    """The code ``crop_flip`` replaced (``fvlm_core/data/samples.py`` before issue 28), kept as the
    oracle: a crop start per axis (or a pad offset), then one number per axis for the flips."""
    size = tuple(int(s) for s in cfg.crop_size)
    crop_rng = rng if cfg.random_crop else None
    pad_rng = crop_rng if cfg.pad_offset == "random" else None
    plans = []
    for dim, s in zip(hu.shape, size):
        if dim >= s:
            start = int(crop_rng.integers(0, dim - s + 1)) if crop_rng is not None else (dim - s) // 2
            plans.append((start, start + s, 0))
        else:
            before = int(pad_rng.integers(0, s - dim + 1)) if pad_rng is not None else (s - dim) // 2
            plans.append((0, dim, before))
    out_hu = np.full(size, cfg.pad_hu, dtype=np.float32)
    out_lab = np.zeros(size, dtype=np.uint8)
    out_hu[tuple(slice(o, o + b - a) for a, b, o in plans)] = hu[tuple(slice(a, b) for a, b, _ in plans)]
    out_lab[tuple(slice(o, o + b - a) for a, b, o in plans)] = labels[tuple(slice(a, b) for a, b, _ in plans)]
    cut = np.zeros(num_anatomies + 1, dtype=bool)
    for axis, (a, b, o) in enumerate(plans):
        if cfg.intact_rule == "strict":
            faces = [0, size[axis] - 1]
        else:
            faces = ([o] if a > 0 else []) + ([o + (b - a) - 1] if b < hu.shape[axis] else [])
        for f in faces:
            vals = np.unique(np.take(out_lab, f, axis=axis))
            cut[vals[(vals > 0) & (vals <= num_anatomies)]] = True
    counts = np.bincount(out_lab.ravel(), minlength=num_anatomies + 1)[: num_anatomies + 1]
    intact = (counts[1:] > 0) & ~cut[1:]
    for axis in range(3):
        if rng.random() < cfg.flip_prob:
            out_hu, out_lab = np.flip(out_hu, axis=axis), np.flip(out_lab, axis=axis)
    return np.ascontiguousarray(out_hu), np.ascontiguousarray(out_lab), intact


class _Draws:
    """A generator that returns given draws (``integers`` for crop starts and pad offsets,
    ``random`` for the flips): the old code run on the draws MONAI made."""

    def __init__(self, integers, flips):
        self._integers, self._flips = list(integers), list(flips)

    def integers(self, low, high):
        value = self._integers.pop(0)
        assert low <= value < high, (low, value, high)
        return value

    def random(self):
        return 0.0 if self._flips.pop(0) else 1.0


def _draws_of(out: np.ndarray, shape, cfg) -> _Draws:
    """The draws behind ``out``, a crop of ``np.arange`` over ``shape`` (every voxel unique, the
    padding -1024): flips from the order along each axis, then start and offset from the corner."""
    size = [int(s) for s in cfg.crop_size]
    inside = out >= 0
    flips = []
    for axis in range(3):
        first = np.argwhere(np.moveaxis(inside, axis, 0))[0]
        line = np.moveaxis(out, axis, 0)[(slice(None), *first[1:])]
        line = line[line >= 0]
        flips.append(bool(line[1] < line[0]))
    unflipped = np.flip(out, [a for a in range(3) if flips[a]]) if any(flips) else out
    corner = np.argwhere(unflipped == unflipped[unflipped >= 0].min())[0]
    source = np.unravel_index(int(unflipped[tuple(corner)]), shape)
    integers = []
    for d, s, offset, start in zip(shape, size, corner, source):
        if d >= s and cfg.random_crop:
            integers.append(int(start))
        elif d < s and cfg.random_crop and cfg.pad_offset == "random":
            integers.append(int(offset))
    return _Draws(integers, flips)


CASES = [
    # (volume shape, crop size): longer, shorter (odd and even differences) and equal axes
    ((20, 9, 14), (16, 12, 14)),
    ((7, 30, 8), (12, 16, 14)),
    ((11, 11, 11), (8, 16, 10)),
]


@pytest.mark.parametrize(("shape", "size"), CASES)
def test_monai_transforms_give_the_hand_written_arrays_for_the_same_draws(shape, size):
    hu = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    labels[labels == 3] = 0
    labels[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 3  # a one-voxel anatomy, rarely cut
    options = itertools.product((True, False), ("random", "centre"), ("interior", "strict"))
    checked = 0
    for random_crop, pad_offset, rule in options:
        cfg = AugmentConfig(size, 0.5, random_crop, rule, pad_offset=pad_offset)
        for seed in range(6):
            h, lab, intact = crop_flip(hu, labels, cfg, 3, np.random.default_rng(seed))
            draws = _draws_of(h, shape, cfg)
            old_h, old_lab, old_intact = _hand_written_crop_flip(hu, labels, cfg, 3, draws)
            np.testing.assert_array_equal(h, old_h)
            np.testing.assert_array_equal(lab, old_lab)
            np.testing.assert_array_equal(intact, old_intact)
            assert h.dtype == np.float32 and lab.dtype == np.uint8 and h.flags.c_contiguous
            checked += 1
    assert checked == 48


def test_the_draws_are_uniform_and_independent():
    """Crop starts and pad offsets uniform over every placement, flips independent with p = 0.2:
    the distributions of the hand-written draws (their generator differs, their law does not)."""
    shape, size = (20, 9, 14), (16, 12, 14)
    hu = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = np.zeros(shape, np.uint8)
    cfg = AugmentConfig(size, 0.2)
    starts, offsets, flips = Counter(), Counter(), Counter()
    n = 600
    for seed in range(n):
        h, _, _ = crop_flip(hu, labels, cfg, 1, np.random.default_rng([7, seed]))
        draws = _draws_of(h, shape, cfg)
        start, offset, equal = draws._integers  # x is as long as the crop: start 0
        assert equal == 0
        starts[start] += 1
        offsets[offset] += 1
        flips.update(a for a, f in enumerate(draws._flips) if f)
    assert sorted(starts) == list(range(5)) and sorted(offsets) == list(range(4))  # every placement
    assert all(70 <= starts[k] <= 170 for k in starts), starts  # n/5 = 120 each
    assert all(100 <= offsets[k] <= 200 for k in offsets), offsets  # n/4 = 150 each
    assert all(85 <= flips[a] <= 155 for a in range(3)), flips  # n * 0.2 = 120 per axis
    # the sample's generator decides everything, whatever was drawn before (the transforms are reused)
    half = AugmentConfig(size, 0.5)
    for seed in range(8):
        first = crop_flip(hu, labels, half, 1, np.random.default_rng([7, seed]))[0]
        crop_flip(hu, labels, half, 1, np.random.default_rng([8, seed]))
        np.testing.assert_array_equal(
            first, crop_flip(hu, labels, half, 1, np.random.default_rng([7, seed]))[0]
        )


def test_intensity_scaling_is_the_references_and_window_hu_to_the_bit():
    """Training scales with MONAI's ``ScaleIntensityRange`` (the reference's); the analysis uses
    ``window_hu`` (no MONAI import on ``fvlm analyze``): the same numbers, numpy and torch."""
    hu = np.random.default_rng(0).integers(-1400, 2500, size=200_000).astype(np.float32)
    hu[:3] = (-1150.0, 350.0, 0.0)
    reference = np.asarray(ScaleIntensityRange(-1150.0, 350.0, 0.0, 1.0, clip=True)(hu))
    np.testing.assert_array_equal(np.asarray(hu_scaling((-1150.0, 350.0))(hu)), reference)
    np.testing.assert_array_equal(window_hu(hu, (-1150.0, 350.0)), reference)
    np.testing.assert_array_equal(window_hu(torch.from_numpy(hu), (-1150.0, 350.0)).numpy(), reference)
    assert reference.min() == 0.0 and reference.max() == 1.0
