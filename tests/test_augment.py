"""Within-alphabet tasks, random affine distortions of meta-training images, and distorted support
copies at evaluation: what each draws, that a seed fixes it, and that tasks without them are as
they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
