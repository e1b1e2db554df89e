"""bench/converge.py: the table and "time to X %" come from the marks' test numbers."""

from __future__ import annotations

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
