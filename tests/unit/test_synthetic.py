"""The synthetic task suite: determinism, disjoint splits, images that encode the answer, and a
text-only guesser held at chance (with a biased generator to show that check can fail)."""

import importlib.util
import io
import json
import math
import random
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from papo_mega.data.synthetic import (
    BACKGROUND,
    CELL_NAMES,
    COLOURS,
    DIFFICULTIES,
    TASKS,
    Number,
    Scene,
    chance_level,
    generate,
    render,
    split_of,
)
from papo_mega.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _fingerprint(samples):
    return [(s.key, s.task, s.question, s.answer, s.image.tobytes()) for s in samples]


def test_deterministic_and_prefix_stable():
    a = _fingerprint(generate("train", 15, seed=3))
    assert a == _fingerprint(generate("train", 15, seed=3))
    assert a[:7] == _fingerprint(generate("train", 7, seed=3))  # sample i does not depend on num
    assert a != _fingerprint(generate("train", 15, seed=4))
    assert [s[1] for s in a[:5]] == list(TASKS)  # tasks take turns


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_splits_are_disjoint(difficulty):
    train = list(generate("train", 1000, seed=0, difficulty=difficulty))
    test = list(generate("test", 1000, seed=0, difficulty=difficulty))
    assert all(split_of(s.scene) == "train" for s in train) and all(split_of(s.scene) == "test" for s in test)
    train_images = {s.image.tobytes() for s in train}
    assert not train_images & {s.image.tobytes() for s in test}


def _mask(image: Image.Image, colour: str | None = None) -> np.ndarray:
    """Pixels of one palette colour (or all non-background pixels)."""
    pixels = np.asarray(image)
    if colour is None:
        return (pixels != BACKGROUND).any(-1)
    return (pixels == COLOURS[colour]).all(-1)


def _components(mask: np.ndarray) -> int:
    """8-connected blobs, by flood fill (scipy is not a dependency)."""
    todo = set(zip(*np.nonzero(mask)))
    count = 0
    while todo:
        count += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for n in [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]:
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
    return count


def _named(question: str, answer: str) -> str:
    """The named colour that is not the answer."""
    first, second = re.search(r"the (\w+) one or the (\w+) one", question).groups()
    return second if answer == first else first


def _check_image(sample, difficulty) -> None:
    image, q, a = sample.image, sample.question, sample.answer
    d = DIFFICULTIES[difficulty]
    assert image.size == (d.image_size, d.image_size) and image.mode == "RGB"
    if sample.task == "count":
        assert _components(_mask(image)) == int(a)
    elif sample.task == "color_at":
        cell = d.image_size // d.grid
        index = CELL_NAMES[d.grid].index(re.search(r"in the (.+)\?", q).group(1))
        row, col = divmod(index, d.grid)
        region = np.asarray(image)[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
        shape = (region != BACKGROUND).any(-1)
        assert shape.sum() > 10 and (region[shape] == COLOURS[a]).all()
    elif sample.task == "compare_size":
        assert _mask(image, a).sum() > _mask(image, _named(q, a)).sum() > 0
    elif sample.task == "left_of":
        xs = [np.nonzero(_mask(image, c))[1].mean() for c in (a, _named(q, a))]
        assert xs[0] < xs[1]
    else:
        assert _mask(image).sum() > 0 and len(a) <= d.digits


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_images_encode_the_answer(difficulty):
    for sample in generate("test", 150, seed=1, difficulty=difficulty):
        _check_image(sample, difficulty)


def test_seven_segment_digits_are_distinct():
    images = [render(Scene(56, number=Number(str(d), 10, 6, 40, "black"))) for d in range(10)]
    pixels = [int(_mask(im).sum()) for im in images]
    assert len({im.tobytes() for im in images}) == 10
    assert pixels.index(max(pixels)) == 8 and pixels.index(min(pixels)) == 1


def _text_only_accuracy(train, test) -> float:
    """The best text-only predictor: the majority answer per exact question string."""
    by_question = defaultdict(Counter)
    for s in train:
        by_question[s.question][s.answer] += 1
    overall = Counter(s.answer for s in train).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    return sum(guess.get(s.question, overall) == s.answer for s in test) / len(test)


def _at_chance(train, test, chance: float) -> bool:
    margin = 4 * math.sqrt(chance * (1 - chance) / len(test)) + 0.005  # 4 sigma of a test-set accuracy
    return _text_only_accuracy(train, test) <= chance + margin


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
@pytest.mark.parametrize("task", TASKS)
def test_text_only_baseline_is_at_chance(task, difficulty):
    train = list(generate("train", 1000, seed=0, tasks=[task], difficulty=difficulty))
    test = list(generate("test", 1000, seed=0, tasks=[task], difficulty=difficulty))
    assert _at_chance(train, test, chance_level(task, difficulty))


def _biased(samples, favourite: dict, rng: random.Random, n: int) -> list:
    """A generator with a sampling bug: the first answer seen for a question is 5x over-represented."""
    kept = []
    for s in samples:
        if s.answer == favourite.setdefault(s.question, s.answer) or rng.random() < 0.2:
            kept.append(s)
            if len(kept) == n:
                return kept
    raise AssertionError("draw more samples")


@pytest.mark.parametrize("task", TASKS)
def test_biased_generator_fails_the_chance_check(task):
    favourite: dict = {}
    rng = random.Random(0)
    train = _biased(generate("train", 10_000, seed=0, tasks=[task]), favourite, rng, 400)
    test = _biased(generate("test", 10_000, seed=0, tasks=[task]), favourite, rng, 400)
    assert not _at_chance(train, test, chance_level(task))


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        list(generate("train", 1, tasks=["count", "colour"]))
    with pytest.raises(ConfigError, match="unknown split"):
        list(generate("valid", 1))
    with pytest.raises(ConfigError, match="multiple of 28"):
        DIFFICULTIES["easy"].__class__(image_size=100)


def _tool():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "tools" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_synthetic_writes_shards(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "train"
    assert tool.main(["--split", "train", "--num", "12", "--out", str(out), "--samples-per-shard", "5",
                      "--tasks", "count,read_number", "--seed", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2] and manifest["complete"] is True
    expected = list(generate("train", 12, seed=2, tasks=["count", "read_number"]))
    with tarfile.open(out / "shard-000001.tar") as tar:
        meta = json.load(tar.extractfile(f"{expected[5].key}.json"))
        png = Image.open(io.BytesIO(tar.extractfile(f"{expected[5].key}.png").read()))
        assert meta == {"question": expected[5].question, "answer": expected[5].answer, "task": expected[5].task}
        assert png.tobytes() == expected[5].image.tobytes()
    assert tool.main(["--split", "train", "--num", "12", "--out", str(out)]) == 2  # not empty, no --resume
    assert tool.main(["--split", "test", "--num", "3", "--out", str(tmp_path / "t"), "--tasks", "nope"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "--resume" in errors[0] and "nope" in errors[1]
