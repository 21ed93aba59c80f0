"""The one minimum-size rule, along the world axes that preprocessing reorients scans to."""

from __future__ import annotations

import numpy as np
import pytest

from lowlabel.data.size import coarsest_factor, patch_problem, shortfall, too_small, world_extent

# voxel axes (i, j, k) run along (S, R, A): a sagittal-first scan of 10 x 40 x 30 voxels of 2 mm
PERMUTED = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])


def test_extent_follows_the_world_axes_not_the_voxel_axes():
    assert world_extent((10, 40, 30), PERMUTED).tolist() == [80.0, 60.0, 20.0]
    assert world_extent((10, 40, 30), np.diag([2.0, 2.0, 2.0, 1])).tolist() == [20.0, 80.0, 60.0]


def test_the_spacing_applies_to_the_axis_it_names():
    extent = world_extent((10, 40, 30), PERMUTED)  # 20 mm along S
    # 4 mm along S leaves 5 voxels there: too few for 4 levels (8), enough for 3 (4)
    assert shortfall(extent, (1.0, 1.0, 4.0), 3, 4) == (8, 5)
    assert shortfall(extent, (1.0, 1.0, 4.0), 3, 3) is None
    # a 2D model convolves within R-A slices: the short S axis does not count
    assert shortfall(extent, (1.0, 1.0, 4.0), 2, 4) is None


def test_a_sliding_window_must_be_half_covered():
    extent = (40.0, 40.0, 40.0)
    assert shortfall(extent, (1.0, 1.0, 1.0), 3, 3) is None
    assert shortfall(extent, (1.0, 1.0, 1.0), 3, 3, window=(96, 96, 96)) == (48, 40)


def test_the_message_names_the_fix():
    message = too_small((20.0, 20.0, 20.0), (4.0, 4.0, 4.0), 3, 5)
    assert "5-level UNet needs at least 16 voxels" in message and "about 5" in message
    assert too_small((64.0, 64.0, 64.0), (1.0, 1.0, 1.0), 3, 5) is None


@pytest.mark.parametrize(
    "patch, levels, problem",
    [
        ((64, 64, 64), 4, None),
        ((20, 20, 20), 4, "divisible by 8"),
        ((16, 16, 16), 5, "single voxel"),
    ],
)
def test_patch_rule(patch, levels, problem):
    found = patch_problem(patch, levels, instance_norm=True)
    assert (found is None) if problem is None else (problem in found)
    assert coarsest_factor(levels) == 2 ** (levels - 1)
