"""bench/converge.py: the table and "time to X %" come from the marks' test numbers."""

from __future__ import annotations

from pathlib import Path

from bench.converge import RECIPES, table, time_to


def result(name: str, accuracies: list[float]) -> dict:
    marks = [
        {"minutes": m, "steps": 10 * m, "acc_post": a, "acc_post_ci95": 0.01}
        for m, a in zip((2, 5, 10), accuracies)
    ]
    return {"recipe": name, "overrides": [], "marks": marks}


def test_time_to_a_target_is_the_first_mark_at_or_above_it():
    run = result("x", [0.8, 0.9, 0.96])
    assert time_to(run, 0.9) == 5 and time_to(run, 0.95) == 10 and time_to(run, 0.97) is None


def test_the_table_has_one_row_per_recipe_with_each_marks_accuracy_and_updates():
    text = table([result("today", [0.5, 0.6, 0.7]), result("shipped", [0.8, 0.91, 0.96])])
    lines = text.splitlines()
    assert lines[0] == "| recipe | 2 min | 5 min | 10 min | time to 90 % | time to 95 % |"
    assert lines[2] == (
        "| today | 50.0 ± 1.0 (20) | 60.0 ± 1.0 (50) | 70.0 ± 1.0 (100) | not within the budget "
        "| not within the budget |"
    )
    assert lines[3].endswith("| ≤ 5 min | ≤ 10 min |")


def test_every_recipe_is_a_list_of_option_value_pairs():
    for name, overrides in RECIPES.items():
        assert len(overrides) % 2 == 0, name
        assert all(option.startswith("--") for option in overrides[::2]), name


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_20way_protonet_config_halves_its_rate_every_2000_updates_and_constant_lr_keeps_it(
    resolved_config,
):
    shipped = resolved_config("-c", CONFIGS / "protonet_20way1shot.yaml")
    schedule, data = shipped["model"]["init_args"]["lr_scheduler"], shipped["data"]["init_args"]
    assert schedule["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert schedule["init_args"]["gamma"] == 0.5
    updates_per_epoch = data["tasks_per_epoch"] // data["meta_batch_size"]
    assert schedule["init_args"]["step_size"] * updates_per_epoch == 2000  # an epoch-interval step
    constant = resolved_config("-c", CONFIGS / "protonet_20way1shot.yaml", *RECIPES["constant-lr"])
    assert constant["model"]["init_args"]["lr_scheduler"] is None


def test_the_20way_protonet_config_takes_the_euclidean_distance_and_within_keeps_the_square(resolved_config):
    across = resolved_config("-c", CONFIGS / "protonet_20way1shot.yaml")
    squared = resolved_config("-c", CONFIGS / "protonet_20way1shot.yaml", *RECIPES["squared"])
    within = resolved_config(
        "-c", CONFIGS / "protonet_20way1shot.yaml", "-c", CONFIGS / "protonet_20way1shot_within.yaml"
    )
    assert [c["model"]["init_args"]["distance"] for c in (across, squared, within)] == [
        "euclidean",
        "squared",
        "squared",
    ]
    # Stacking the within config changes the distance and the tasks, nothing else of the model.
    assert {k: v for k, v in within["model"]["init_args"].items() if k != "distance"} == {
        k: v for k, v in across["model"]["init_args"].items() if k != "distance"
    }


def test_finn_20way_restores_the_papers_maml_settings_on_the_shipped_20way_config(resolved_config):
    shipped = resolved_config("-c", CONFIGS / "omniglot_20way1shot.yaml")
    paper = resolved_config("-c", CONFIGS / "omniglot_20way1shot.yaml", *RECIPES["finn-20way"])
    settings = ("inner_steps", "inner_lr", "eval_inner_steps")
    assert [shipped["model"]["init_args"][k] for k in settings] == [1, 0.4, 3]
    assert [paper["model"]["init_args"][k] for k in settings] == [5, 0.1, 5]
    assert (
        shipped["data"]["init_args"]["meta_batch_size"],
        paper["data"]["init_args"]["meta_batch_size"],
    ) == (8, 16)
    assert shipped["data"]["init_args"]["augment_affine"] and not paper["data"]["init_args"]["augment_affine"]


def test_five_alphabets_moves_one_alphabet_from_validation_to_training_and_keeps_the_test_alphabets(
    resolved_config,
):
    from lthmaml.data.imageset import split_classes

    within = ("-c", CONFIGS / "protonet_20way1shot.yaml", "-c", CONFIGS / "protonet_20way1shot_within.yaml")
    shipped = resolved_config(*within)["data"]["init_args"]
    five = resolved_config(*within, *RECIPES["five-alphabets"])["data"]["init_args"]
    assert (shipped["class_split"], five["class_split"]) == ([4, 2, 2], [5, 1, 2])
    assert five["split_by_alphabet"] and five["task_sampling"] == "within_alphabet"
    classes = [f"{alphabet}/c{i}" for alphabet in "ABCDEFGH" for i in range(3)]  # 8, as in the subset
    seed = shipped["split_seed"]
    four_alphabets = split_classes(classes, shipped["class_split"], seed, by_alphabet=True)
    five_alphabets = split_classes(classes, five["class_split"], seed, by_alphabet=True)
    assert five_alphabets["test"] == four_alphabets["test"]  # the same test tasks
    assert set(four_alphabets["train"]) < set(five_alphabets["train"])
    assert set(five_alphabets["val"]) < set(four_alphabets["val"])
