import io

import numpy as np
import pytest
from PIL import Image

from curation.imaging import COLOURS, assign_colours, axial, ct_window, encode_png, key_slice, overlay, percentile_normalise, reorient


def test_soft_tissue_window_is_vila_m3s():
    assert ct_window(np.array([-150.0, 50.0, 250.0, 3000.0])).tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="unknown CT window"):
        ct_window(np.zeros(2), "brain")


def test_percentile_normalise_ignores_background():
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:8, 2:8, 2:8] = np.linspace(100, 200, 216).reshape(6, 6, 6)
    out = percentile_normalise(vol)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out.max() == 255


def test_key_slice_largest_area():
    mask = np.zeros((8, 8, 6), bool)
    mask[1:3, 1:3, 1] = True
    mask[1:6, 1:6, 4] = True
    assert key_slice(mask) == 4
    assert key_slice(np.zeros((4, 4, 6), bool)) == 3


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1), (-1, 1, 1)])
def test_axial_is_radiological_whatever_the_voxel_order(flip):
    """A marker at the patient's right-anterior shows at the picture's top left, for any
    voxel order of the same anatomy."""
    lps = np.zeros((6, 5, 3), np.uint8)
    lps[0, 0, 1] = 255  # LPS index 0 on x = most right, 0 on y = most anterior
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    # the same voxels stored flipped, with an affine that says so
    array = lps[:: -1 if flip[0] < 0 else 1, :: -1 if flip[1] < 0 else 1, :]
    affine = lps_affine.copy()
    for axis, f in enumerate(flip):
        if f < 0:
            affine[:, axis] *= -1
            affine[:3, 3] += lps_affine[:3, axis] * (lps.shape[axis] - 1)
    picture = axial(array, affine, 1)
    assert picture.shape == (5, 6)
    assert picture[0, 0] == 255


def test_reorient_keeps_channels():
    vol = np.random.default_rng(0).normal(size=(4, 5, 6, 3))
    out, aff = reorient(vol, np.diag([1.0, 1.0, 1.0, 1.0]), "LPS")
    assert out.shape == (4, 5, 6, 3)
    assert np.array_equal(out, vol[::-1, ::-1])
    assert aff[0, 0] == -1 and aff[0, 3] == 3


def test_overlay_colours_are_the_named_table():
    gray = np.zeros((4, 4), np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[1, 1] = 7
    rgb = overlay(gray, labels, {7: "red"}, alpha=1.0)
    assert tuple(rgb[1, 1]) == dict(COLOURS)["red"] and tuple(rgb[0, 0]) == (0, 0, 0)
    assert assign_colours([5, 1, 9]) == {5: "red", 1: "blue", 9: "yellow"}


def test_png_is_capped_and_deterministic():
    picture = (np.arange(300 * 200) % 256).astype(np.uint8).reshape(200, 300)
    png = encode_png(picture, max_side=150)
    assert png == encode_png(picture, max_side=150)
    assert Image.open(io.BytesIO(png)).size == (150, 100)
    assert Image.open(io.BytesIO(encode_png(picture, max_side=512))).size == (300, 200)
