"""Evaluation figures (eval_metrics.py) against a plain per-answer computation, and the
format-aware vision reliance on the cases issue 17 names: a model that answers at chance without
the image relies on it; one that stops answering does not."""

import random

import pytest

from papo_mega.eval_metrics import (
    RELIANCE_MIN_FORMAT,
    add_answer,
    markdown_table,
    merge_counts,
    new_cell,
    scalar_tags,
    tables,
)

VIEWS = ("original", "masked", "blank")


def _counts(answers):
    """answers: [(view, task, accuracy, format)] -> a {view: {task: cell}} table, as one rank builds it."""
    table = {}
    for view, task, acc, fmt in answers:
        for key in (task, "overall"):
            add_answer(table.setdefault(view, {}).setdefault(key, new_cell()), acc, fmt)
    return table


def _answers(rng, view_quality):
    """Random answers; view_quality[view] = (p_correct, p_wellformed)."""
    out = []
    for view, (p_acc, p_fmt) in view_quality.items():
        for task in ("count", "compare_size"):
            for _ in range(rng.randrange(20, 40)):
                fmt = float(rng.random() < p_fmt)
                out.append((view, task, float(rng.random() < p_acc), fmt))
    return out


def test_figures_equal_a_plain_computation_over_answers_split_across_ranks():
    rng = random.Random(0)
    answers = _answers(rng, {"original": (0.8, 0.9), "masked": (0.5, 0.7), "blank": (0.3, 0.6)})
    rng.shuffle(answers)
    half = len(answers) // 2
    result = tables(merge_counts([_counts(answers[:half]), _counts(answers[half:])]), 1, VIEWS,
                    {"count": 0.2, "compare_size": 0.5})
    for view in VIEWS:
        for task in ("count", "compare_size", "overall"):
            mine = [a for a in answers if a[0] == view and (task == "overall" or a[1] == task)]
            assert result["accuracy"][view][task] == pytest.approx(sum(a[2] for a in mine) / len(mine))
            assert result["format"][view][task] == pytest.approx(sum(a[3] for a in mine) / len(mine))
            formed = [a for a in mine if a[3]]
            assert result["wellformed_accuracy"][view][task] == pytest.approx(sum(a[2] for a in formed) / len(formed))
        assert result["format_rate"][view] == result["format"][view]["overall"]
    per_task = {t: sum(1 for a in answers if a[0] == "original" and a[1] == t) for t in ("count", "compare_size")}
    expected_chance = (0.2 * per_task["count"] + 0.5 * per_task["compare_size"]) / sum(per_task.values())
    assert result["chance"]["overall"] == pytest.approx(expected_chance)
    wf = result["wellformed_accuracy"]
    assert result["vision_reliance"]["original_minus_blank"] == pytest.approx(wf["original"]["overall"]
                                                                              - wf["blank"]["overall"])


def _uniform(view_answers):
    """{view: (answers, correct, well-formed, correct and well-formed)} for one task."""
    out = []
    for view, (n, correct_wf, wf, correct_unformed) in view_answers.items():
        out += [(view, "compare_size", 1.0, 1.0)] * correct_wf + [(view, "compare_size", 0.0, 1.0)] * (wf - correct_wf)
        out += [(view, "compare_size", 1.0, 0.0)] * correct_unformed
        out += [(view, "compare_size", 0.0, 0.0)] * (n - wf - correct_unformed)
    return tables(merge_counts([_counts(out)]), 1, VIEWS, {"compare_size": 0.5})


def test_a_model_at_chance_without_the_image_relies_on_it():
    # Well-formed everywhere; 90 % right with the image, 50 % (chance) without.
    result = _uniform({"original": (100, 90, 100, 0), "masked": (100, 50, 100, 0), "blank": (100, 50, 100, 0)})
    assert result["vision_reliance"]["original_minus_blank"] == pytest.approx(0.4)
    assert result["vision_reliance_unmeasured"] == {}


def test_a_model_that_stops_answering_gets_no_reliance_figure():
    # Issue 17's measured demo: 0.464 on the original, 0.011 on the masked image with format rate 0.018.
    # The old figure (accuracy original minus masked) called that +45 points of vision reliance.
    result = _uniform({"original": (1000, 464, 1000, 0), "masked": (1000, 2, 18, 9), "blank": (1000, 5, 10, 5)})
    assert result["accuracy"]["original"]["overall"] - result["accuracy"]["masked"]["overall"] > 0.4
    assert result["vision_reliance"] == {"original_minus_masked": None, "original_minus_blank": None}
    assert "stops answering" in result["vision_reliance_unmeasured"]["masked"]
    assert "not measured" in markdown_table(result)
    tags = scalar_tags(result)
    assert "eval/reliance_blank" not in tags and tags["eval/masked_format_rate"] == pytest.approx(0.018)


def test_a_model_that_ignores_the_image_scores_no_reliance():
    result = _uniform({"original": (100, 50, 100, 0), "masked": (100, 50, 100, 0), "blank": (100, 50, 100, 0)})
    assert result["vision_reliance"]["original_minus_blank"] == pytest.approx(0.0)


def test_the_format_threshold_applies_to_the_original_view_too():
    bad = int(100 * RELIANCE_MIN_FORMAT) - 1
    result = _uniform({"original": (100, bad, bad, 0), "masked": (100, 50, 100, 0), "blank": (100, 50, 100, 0)})
    assert result["vision_reliance"]["original_minus_blank"] is None
    assert "original view" in result["vision_reliance_unmeasured"]["blank"]


def test_unknown_chance_is_none_not_a_guess():
    result = tables(merge_counts([_counts([("original", "real_task", 1.0, 1.0)])]), 1, ("original",), {})
    assert result["chance"] == {"real_task": None, "overall": None}
    assert "eval/chance_accuracy" not in scalar_tags(result)
