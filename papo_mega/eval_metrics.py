"""The evaluation's figures, from answer counts: pure functions (evaluate.py gathers the counts).

Per image view and task: accuracy (correct answers / answers), format rate (answers in the PAPO
think/boxed format / answers) and accuracy among well-formed answers; per task the chance level
of a guesser that reads only the question (known for the synthetic suite).

Why well-formed accuracy: a model shown a masked or blank image often stops writing the format
at all. Its plain accuracy then drops to ~0, and "original minus blank" looks like strong vision
reliance when it is format breakage. So vision reliance is measured on well-formed answers only,
and only where the view keeps a format rate of at least RELIANCE_MIN_FORMAT:

    reliance(view) = wellformed_accuracy(original) - wellformed_accuracy(view)

A model that answers at chance without the image scores original-minus-chance (it relies on the
image); a model that just stops answering gets no reliance figure (None, with the reason); a
model that answers equally well either way scores ~0.
"""

from __future__ import annotations

from collections import defaultdict

RELIANCE_MIN_FORMAT = 0.5
"""Below this format rate on a view (or on the original) its reliance figure is not reported."""
OVERALL = "overall"


def new_cell() -> list[float]:
    """Counts for one (view, task): [correct, well-formed, answers, correct and well-formed]."""
    return [0.0, 0.0, 0, 0.0]


def add_answer(cell: list[float], accuracy: float, fmt: float) -> None:
    cell[0] += accuracy
    cell[1] += fmt
    cell[2] += 1
    cell[3] += accuracy * fmt


def merge_counts(parts: list[dict]) -> dict:
    """Sum {view: {task: cell}} count tables (one per data-parallel rank)."""
    merged: dict = defaultdict(lambda: defaultdict(new_cell))
    for part in parts:
        for view, tasks in part.items():
            for task, cell in tasks.items():
                merged[view][task] = [a + b for a, b in zip(merged[view][task], cell)]
    return merged


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def overall_chance(chance: dict[str, float | None], answers: dict[str, float]) -> float | None:
    """Answer-weighted mean chance level over tasks; None if any task's chance is unknown."""
    tasks = [t for t in answers if t != OVERALL and answers[t]]
    if not tasks or any(chance.get(t) is None for t in tasks):
        return None
    return sum(chance[t] * answers[t] for t in tasks) / sum(answers[t] for t in tasks)


def vision_reliance(wellformed: dict[str, float | None], fmt: dict[str, float]) -> tuple[dict, dict]:
    """{original_minus_<view>: figure or None} and {view: why there is none} (overall figures)."""
    reliance, unmeasured = {}, {}
    base = wellformed.get("original")
    for view in (v for v in wellformed if v != "original"):
        name = f"original_minus_{view}"
        low = [v for v in ("original", view) if fmt.get(v, 0.0) < RELIANCE_MIN_FORMAT]
        if low or base is None or wellformed[view] is None:
            worst = low[0] if low else view
            unmeasured[view] = (f"format rate {fmt.get(worst, 0.0):.2f} on the {worst} view is below "
                                f"{RELIANCE_MIN_FORMAT}: the model stops answering, which is not perception")
            reliance[name] = None
        else:
            reliance[name] = base - wellformed[view]
    return reliance, unmeasured


def tables(counts: dict, k: int, views: tuple[str, ...], chance: dict[str, float | None]) -> dict:
    """The result dict of an evaluation (eval.json) from merged counts {view: {task: cell}}."""
    tasks = sorted({t for v in counts.values() for t in v if t != OVERALL}) + [OVERALL]
    per = lambda i, j: {view: {t: _ratio(counts[view][t][i], counts[view][t][j])  # noqa: E731
                               for t in tasks if counts[view][t][2]} for view in views}
    accuracy, fmt_by_task, wellformed = per(0, 2), per(1, 2), per(3, 1)
    fmt = {view: fmt_by_task[view].get(OVERALL) or 0.0 for view in views}
    answers = {t: counts[views[0]][t][2] for t in tasks} if views else {}
    chance_by_task = {t: chance.get(t) for t in tasks if t != OVERALL}
    chance_by_task[OVERALL] = overall_chance(chance, answers)
    result = {"k": k, "questions": answers.get(OVERALL, 0) // k if views else 0, "accuracy": accuracy,
              "format_rate": fmt, "format": fmt_by_task, "wellformed_accuracy": wellformed,
              "chance": chance_by_task, "reliance_min_format": RELIANCE_MIN_FORMAT}
    if "original" in views:
        overall_wf = {view: wellformed[view].get(OVERALL) for view in views}
        result["vision_reliance"], result["vision_reliance_unmeasured"] = vision_reliance(overall_wf, fmt)
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(result: dict) -> str:
    """Per task and view: accuracy, format rate, accuracy among well-formed answers (%), chance;
    then the format-aware vision reliance."""
    views = list(result["accuracy"])
    tasks = list(result["accuracy"][views[0]]) if views else []
    chance = result.get("chance", {})
    head = ["task", "chance"] + [f"{v} {c}" for v in views for c in ("acc", "format", "acc if well-formed")]
    lines = [f"avg@{result['k']} on {result['questions']} questions (%; acc if well-formed = accuracy among "
             f"answers in the think/boxed format)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task in tasks:
        cells = [task, _pct(chance.get(task))]
        for v in views:
            cells += [_pct(result["accuracy"][v].get(task)), _pct(result.get("format", {}).get(v, {}).get(task)),
                      _pct(result.get("wellformed_accuracy", {}).get(v, {}).get(task))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    unmeasured = result.get("vision_reliance_unmeasured", {})
    for name, value in result.get("vision_reliance", {}).items():
        view = name.removeprefix("original_minus_")
        text = f"{100 * value:+.1f} points" if value is not None else f"not measured ({unmeasured.get(view, '')})"
        lines.append(f"vision reliance, original minus {view} (well-formed answers): {text}")
    return "\n".join(lines) + "\n"


def scalar_tags(result: dict) -> dict[str, float]:
    """The overall figures as metrics-file / TensorBoard scalars (docs/monitoring.md); None is left out."""
    from papo_mega.metrics import eval_tag

    out = {}
    for view, acc in result["accuracy"].items():
        out[eval_tag(view)] = acc.get(OVERALL, 0.0)
        out[f"eval/{view}_format_rate"] = result["format_rate"][view]
        out[f"eval/{view}_wellformed_accuracy"] = result["wellformed_accuracy"][view].get(OVERALL)
    out["eval/chance_accuracy"] = result["chance"].get(OVERALL)
    for name, value in result.get("vision_reliance", {}).items():
        out[f"eval/reliance_{name.removeprefix('original_minus_')}"] = value
    return {tag: value for tag, value in out.items() if value is not None}
