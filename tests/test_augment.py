"""Within-alphabet tasks, random affine distortions of meta-training images, and distorted support
copies at evaluation: what each draws, that a seed fixes it, and that tasks without them are as
they were; the numpy warp the device runs without torch gives torch's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lthmaml.data.affine import AffineRanges, support_copies, warp
from lthmaml.data.augment import Affine
from lthmaml.data.fewshot import FewShotTasks
from lthmaml.errors import ConfigError

GROUPS = [0] * 6 + [1] * 3 + [2] * 8  # alphabets of 6, 3 and 8 characters


def pool(classes: int = 17) -> torch.Tensor:
    return torch.rand(classes, 4, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def drawn_classes(tasks: FewShotTasks, images: torch.Tensor, seed: int) -> set[int]:
    """The classes a task drew, found by matching its support images to the pool's rows."""
    batch = tasks.sample(np.random.default_rng(seed))
    flat = images.flatten(2)
    found = set()
    for image in batch.support_x[: tasks.ways * tasks.shots].flatten(1):
        hits = (flat == image).all(-1).any(-1).nonzero().flatten().tolist()
        found.update(hits)
    return found


def test_within_alphabet_tasks_draw_all_their_classes_from_one_alphabet_with_classes_enough():
    images = pool()
    tasks = FewShotTasks(images, ways=5, shots=1, query_shots=1, groups=GROUPS)
    alphabets_seen = set()
    for seed in range(40):
        classes = drawn_classes(tasks, images, seed)
        alphabets = {GROUPS[c] for c in classes}
        assert len(classes) == 5 and len(alphabets) == 1
        alphabets_seen |= alphabets
    assert alphabets_seen == {0, 2}  # alphabet 1 has only 3 characters: never drawn for 5-way
    across = FewShotTasks(images, ways=5, shots=1, query_shots=1)
    assert any(len({GROUPS[c] for c in drawn_classes(across, images, s)}) > 1 for s in range(10))


def test_within_alphabet_with_no_alphabet_large_enough_is_a_one_line_config_error():
    with pytest.raises(
        ConfigError, match=r"no alphabet of the test split has 9 characters \(the largest has 8\)"
    ):
        FewShotTasks(pool(), ways=9, shots=1, query_shots=1, groups=GROUPS, name="test")


def test_affine_distortions_are_fixed_by_the_task_seed_and_leave_undistorted_tasks_unchanged():
    images = pool()
    plain = FewShotTasks(images, ways=3, shots=1, query_shots=2)
    distorted = FewShotTasks(images, ways=3, shots=1, query_shots=2, affine=Affine())
    a, b = distorted.sample(np.random.default_rng(3)), distorted.sample(np.random.default_rng(3))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    base = plain.sample(np.random.default_rng(3))
    assert torch.equal(a.support_y, base.support_y) and torch.equal(a.query_y, base.query_y)
    assert (a.support_x - base.support_x).abs().max() > 0.05  # every image moved
    identity = Affine(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=0.0)
    still = FewShotTasks(images, ways=3, shots=1, query_shots=2, affine=identity).sample(
        np.random.default_rng(3)
    )
    torch.testing.assert_close(still.support_x, base.support_x, atol=1e-5, rtol=0)


def test_a_pure_shift_moves_the_picture_by_the_drawn_fraction_of_the_side():
    image = torch.zeros(1, 1, 20, 20)
    image[0, 0, 10, 10] = 1.0
    shift = Affine(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=0.1)
    matrix = shift.matrices(1, np.random.default_rng(0))
    out = shift(image, np.random.default_rng(0))
    row, col = divmod(int(out.flatten().argmax()), 20)
    # affine_grid samples the input at A @ output: the picture moves by minus the shift.
    assert (col, row) == (round(10 - matrix[0, 0, 2].item() * 10), round(10 - matrix[0, 1, 2].item() * 10))


def test_uint8_photos_stay_uint8_and_bad_ranges_are_config_errors():
    photos = (torch.rand(4, 3, 10, 10) * 255).to(torch.uint8)
    assert Affine()(photos, np.random.default_rng(0)).dtype == torch.uint8
    with pytest.raises(ConfigError, match="augment_affine"):
        Affine(scale=(1.2, 0.8))


def test_support_copies_add_distorted_views_of_each_support_image_with_their_labels():
    images = pool()
    base = FewShotTasks(images, ways=3, shots=2, query_shots=1).sample(np.random.default_rng(5))
    tasks = FewShotTasks(images, ways=3, shots=2, query_shots=1, support_copies=2)
    batch = tasks.sample(np.random.default_rng(5))
    assert batch.support_x.shape[0] == 3 * base.support_x.shape[0]
    assert torch.equal(batch.support_x[:6], base.support_x) and torch.equal(batch.query_x, base.query_x)
    assert batch.support_y.tolist() == base.support_y.tolist() * 3
    assert not torch.equal(batch.support_x[6:12], base.support_x)
    with pytest.raises(ConfigError, match="support_augmentation must be >= 0"):
        FewShotTasks(images, ways=3, shots=1, query_shots=1, support_copies=-1)


# ---------------------------------------------------------------------------------- numpy, no torch
WIDE = {"rotation": 180.0, "shear": 0.8, "scale": (0.4, 2.0), "translate": 0.5}
"""Ranges far past Koch et al.'s, so the warps rotate, shear, scale and shift well into the border."""


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (5, 3, 7, 11), (4, 2, 28, 28), (3, 1, 1, 5)])
@pytest.mark.parametrize("ranges", [WIDE, {}], ids=["wide", "koch"])
def test_the_numpy_warp_gives_torchs_affine_images_to_float32_rounding(shape, ranges):
    for seed in range(4):
        x = np.random.default_rng(seed).random(shape, dtype=np.float32)
        torch_path = Affine(**ranges)(torch.from_numpy(x), np.random.default_rng(seed)).numpy()
        numpy_path = warp(x, AffineRanges(**ranges).matrices(len(x), np.random.default_rng(seed)))
        assert numpy_path.dtype == np.float32 and numpy_path.shape == shape
        np.testing.assert_allclose(numpy_path, torch_path, atol=1e-5, rtol=0)
        assert np.abs(numpy_path - x).max() > 0.05  # the images did move

        photos = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        torch_path = Affine(**ranges)(torch.from_numpy(photos), np.random.default_rng(seed)).numpy()
        numpy_path = warp(photos, AffineRanges(**ranges).matrices(len(x), np.random.default_rng(seed)))
        assert numpy_path.dtype == np.uint8
        difference = np.abs(numpy_path.astype(np.int16) - torch_path)
        assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000


def test_the_warp_keeps_the_identity_and_moves_a_pure_shift_by_whole_pixels():
    x = np.random.default_rng(0).random((2, 1, 6, 9), dtype=np.float32)
    identity = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1))
    np.testing.assert_allclose(warp(x, identity), x, atol=1e-6, rtol=0)
    shift = identity.copy()
    shift[:, 0, 2] = 2 * 2 / 9  # two pixels of 9 to the right in the source: the picture moves left
    np.testing.assert_allclose(warp(x, shift)[..., :7], x[..., 2:], atol=1e-6, rtol=0)
    edge = x[..., 8:9].repeat(2, -1)
    np.testing.assert_allclose(warp(x, shift)[..., 7:], edge, atol=1e-6, rtol=0)  # the edge repeats


def test_matrices_are_the_same_draws_in_numpy_and_torch_for_the_same_seed():
    numpy_draw = AffineRanges().matrices(5, np.random.default_rng(3))
    torch_draw = Affine().matrices(5, np.random.default_rng(3))
    assert numpy_draw.dtype == np.float32 and numpy_draw.shape == (5, 2, 3)
    np.testing.assert_array_equal(numpy_draw, torch_draw)
    assert not np.array_equal(numpy_draw, AffineRanges().matrices(5, np.random.default_rng(4)))
    still = AffineRanges(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=0.0)
    np.testing.assert_array_equal(still.matrices(2, np.random.default_rng(0)), [[[1, 0, 0], [0, 1, 0]]] * 2)
    with pytest.raises(ConfigError, match="augment_affine"):
        AffineRanges(rotation=-1.0)


def test_support_copies_are_the_originals_then_each_copy_drawn_in_turn_from_the_seed():
    """The stream of ``TaskFolderDataModule.support_split`` before the numpy warp: copy ``i`` is
    torch's ``Affine()`` applied to all images with the ``i``-th draw of ``default_rng(seed)``."""
    x = np.random.default_rng(1).random((4, 1, 10, 10), dtype=np.float32)
    out = support_copies(x, 2, seed=7)
    assert out.shape == (12, 1, 10, 10) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:4], x)
    rng = np.random.default_rng(7)
    for copy in (out[4:8], out[8:]):
        np.testing.assert_allclose(copy, Affine()(torch.from_numpy(x), rng).numpy(), atol=1e-5, rtol=0)
    assert np.abs(out[4:8] - out[8:]).max() > 0.05
    np.testing.assert_array_equal(support_copies(x, 2, seed=7), out)
    assert not np.array_equal(support_copies(x, 2, seed=8)[4:], out[4:])
    np.testing.assert_array_equal(support_copies(x, 0, seed=7), x)
