"""A suite of small vision-dependent tasks rendered with PIL, deterministic from a seed.

    for sample in generate("train", 1000, seed=0, tasks=["count", "left_of"], difficulty="easy"):
        sample.image, sample.question, sample.answer

Tasks (answers are short: a number or a colour word):
- `count`: how many shapes are in the image.
- `color_at`: the colour of the shape in a named cell of a 2x2 or 3x3 grid.
- `compare_size`: which of two named (by colour) shapes is larger.
- `left_of`: which of two named shapes is further left.
- `read_number`: a number drawn as seven-segment digits (no fonts needed).

The question text alone carries no information about the answer: for every distinct question
string the answer is drawn uniformly from its possible answers, so a text-only guesser scores
chance (`chance_level`). Every scene belongs to exactly one split, decided by a hash of the whole
scene description, so no test image ever appears in training data. Samples are drawn from
per-index random streams, so sample i is the same whatever `num` is, and a scene is rendered only
when its image is first read.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from PIL import Image, ImageDraw

from papo_mega.data.shard_writer import Sample, encode_png
from papo_mega.errors import ConfigError

TASKS = ("count", "color_at", "compare_size", "left_of", "read_number")
SPLITS = ("train", "test")

# Colours far apart in RGB so that a small vision tower can separate them; drawn without
# antialiasing, so every shape pixel has exactly its palette value.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 20),
    "purple": (140, 60, 180), "orange": (245, 130, 20), "cyan": (30, 190, 200), "black": (20, 20, 20),
}
BACKGROUND = (245, 245, 245)
KINDS = ("circle", "square", "triangle", "diamond")
# Grid-cell names; the 2x2 names are a subset of the 3x3 ones, so one vocabulary covers both.
CELL_NAMES = {
    2: ("top-left corner", "top-right corner", "bottom-left corner", "bottom-right corner"),
    3: ("top-left corner", "top middle", "top-right corner", "middle left", "centre", "middle right",
        "bottom-left corner", "bottom middle", "bottom-right corner"),
}
# Seven-segment digits: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
            "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}
GAP = 2
"""Minimum background pixels between shapes, so every shape is its own connected blob."""


def _digit_geometry(height: int) -> tuple[int, int, int]:
    """Width, stroke thickness and spacing of a digit of this height."""
    thickness = max(2, height // 8)
    return height // 2, thickness, thickness + height // 8


def _number_width(text: str, height: int) -> int:
    width, _, spacing = _digit_geometry(height)
    return len(text) * width + (len(text) - 1) * spacing


@dataclass(frozen=True)
class Difficulty:
    """Knobs that make tasks easier or harder; the presets are in DIFFICULTIES."""

    image_size: int = 112
    """Image side in pixels; a multiple of 28 (the vision tower's merged-patch unit)."""
    num_colours: int = 4
    """Colours in use (the first n of COLOURS); color_at's chance level is 1/n."""
    count_range: tuple[int, int] = (1, 4)
    """Fewest and most shapes in `count`; its chance level is 1/(hi - lo + 1)."""
    shape_size: tuple[int, int] = (18, 26)
    """Smallest and largest shape side in pixels."""
    grid: int = 2
    """color_at asks about a cell of a grid x grid layout (2 or 3)."""
    size_ratio: float = 2.0
    """compare_size: side of the larger shape / side of the smaller one."""
    distractors: int = 0
    """Extra shapes in other colours in compare_size and left_of."""
    digits: int = 1
    """read_number draws a number below 10**digits."""
    digit_height: int = 40
    """Height of a seven-segment digit in pixels."""

    def __post_init__(self) -> None:
        lo, hi = self.shape_size
        checks = [
            (self.image_size % 28 == 0 and self.image_size >= 56, "image_size must be a multiple of 28, >= 56"),
            (2 <= self.num_colours <= len(COLOURS), f"num_colours must be within 2..{len(COLOURS)}"),
            (1 <= self.count_range[0] <= self.count_range[1], "count_range must be (lo, hi) with 1 <= lo <= hi"),
            (4 <= lo <= hi, "shape_size must be (lo, hi) with 4 <= lo <= hi"),
            (self.grid in CELL_NAMES, "grid must be 2 or 3"),
            (self.size_ratio > 1.0, "size_ratio must be above 1"),
            (0 <= self.distractors <= self.num_colours - 2, "distractors must be within 0..num_colours-2"),
            (self.digits >= 1 and self.digit_height >= 10, "digits must be >= 1 and digit_height >= 10"),
            (_number_width("8" * self.digits, self.digit_height) + 4 <= self.image_size
             and self.digit_height + 4 <= self.image_size, "the digits do not fit the image"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synthetic difficulty {self}: {message}")


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(),
    "medium": Difficulty(num_colours=6, count_range=(1, 6), shape_size=(12, 22), grid=3, size_ratio=1.5,
                         distractors=1, digits=2, digit_height=32),
    "hard": Difficulty(image_size=140, num_colours=8, count_range=(1, 9), shape_size=(8, 16), grid=3,
                       size_ratio=1.2, distractors=3, digits=3, digit_height=24),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: int
    cy: int
    size: int
    """Side of the bounding box; the shape lies inside it."""

    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return self.cx - half, self.cy - half, self.cx - half + self.size - 1, self.cy - half + self.size - 1


@dataclass(frozen=True)
class Number:
    """A number drawn as seven-segment digits, top-left corner at (x, y)."""

    text: str
    x: int
    y: int
    height: int
    colour: str


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image; `split_of` hashes it to pick the split."""

    size: int
    shapes: tuple[Shape, ...] = ()
    number: Number | None = None


@dataclass
class SyntheticSample:
    key: str
    task: str
    question: str
    answer: str
    scene: Scene = field(repr=False)

    @cached_property
    def image(self) -> Image.Image:
        return render(self.scene)

    def to_shard_sample(self) -> Sample:
        return Sample(key=self.key, image_bytes=encode_png(self.image), image_ext="png",
                      meta={"question": self.question, "answer": self.answer, "task": self.task})


def resolve_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"unknown synthetic difficulty {difficulty!r}; choose one of: {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The tasks to generate (all when None); unknown names are a ConfigError."""
    chosen = tuple(tasks) if tasks else TASKS
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown synthetic task(s) {', '.join(unknown)}; choose from: {', '.join(TASKS)}")
    return chosen


def chance_level(task: str, difficulty: str | Difficulty = "easy") -> float:
    """Accuracy of the best guesser that sees only the question text."""
    d = resolve_difficulty(difficulty)
    lo, hi = d.count_range
    return {"count": 1 / (hi - lo + 1), "color_at": 1 / d.num_colours, "compare_size": 0.5,
            "left_of": 0.5, "read_number": 10.0 ** -d.digits}[check_tasks([task])[0]]


# ---- scene builders: rng, difficulty -> (question, answer, scene) --------------------------------

def _palette(d: Difficulty) -> list[str]:
    return list(COLOURS)[: d.num_colours]


def _place(rng: random.Random, d: Difficulty, specs: list[tuple[str, str, int]],
           accept: Callable[[list[Shape], Shape], bool] = lambda placed, new: True) -> list[Shape]:
    """Random non-overlapping positions for (kind, colour, size) specs, in order."""
    placed: list[Shape] = []
    for kind, colour, size in specs:
        for _ in range(500):
            half = size // 2 + GAP
            new = Shape(kind, colour, rng.randint(half, d.image_size - half), rng.randint(half, d.image_size - half),
                        size)
            if all(_apart(new, old) for old in placed) and accept(placed, new):
                placed.append(new)
                break
        else:
            raise ConfigError(f"synthetic difficulty {d}: could not place {len(specs)} shapes; "
                              f"use a larger image_size or smaller shape_size")
    return placed


def _apart(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + GAP < bx0 or bx1 + GAP < ax0 or ay1 + GAP < by0 or by1 + GAP < ay0


def _count(rng: random.Random, d: Difficulty) -> tuple[str, str, Scene]:
    n = rng.randint(*d.count_range)
    specs = [(rng.choice(KINDS), rng.choice(_palette(d)), rng.randint(*d.shape_size)) for _ in range(n)]
    return "How many shapes are in the image?", str(n), Scene(d.image_size, tuple(_place(rng, d, specs)))


def _color_at(rng: random.Random, d: Difficulty) -> tuple[str, str, Scene]:
    cell = d.image_size // d.grid
    target = rng.randrange(d.grid * d.grid)
    shapes = []
    for index in range(d.grid * d.grid):
        size = min(rng.randint(*d.shape_size), int(cell * 0.7))
        slack = (cell - size) // 4  # jitter, yet the shape never leaves its cell
        cx = (index % d.grid) * cell + cell // 2 + rng.randint(-slack, slack)
        cy = (index // d.grid) * cell + cell // 2 + rng.randint(-slack, slack)
        shapes.append(Shape(rng.choice(KINDS), rng.choice(_palette(d)), cx, cy, size))
    name = CELL_NAMES[d.grid][target]
    return f"What colour is the shape in the {name}?", shapes[target].colour, Scene(d.image_size, tuple(shapes))


def _named_pair(rng: random.Random, d: Difficulty) -> tuple[str, str, str, list[str]]:
    """Two named colours in mention order, the answer (uniform over the two), and distractor colours."""
    first, second, *others = rng.sample(_palette(d), d.num_colours)
    return first, second, rng.choice([first, second]), others[: d.distractors]


def _distractor_specs(rng: random.Random, d: Difficulty, colours: list[str]) -> list[tuple[str, str, int]]:
    return [(rng.choice(KINDS), colour, rng.randint(*d.shape_size)) for colour in colours]


def _compare_size(rng: random.Random, d: Difficulty) -> tuple[str, str, Scene]:
    first, second, answer, others = _named_pair(rng, d)
    small = rng.randint(*d.shape_size)
    kind = rng.choice(KINDS)  # one kind for both, so a larger side always means a larger area
    specs = [(kind, answer, round(small * d.size_ratio)), (kind, first if answer == second else second, small)]
    shapes = _place(rng, d, specs + _distractor_specs(rng, d, others))
    question = f"Which shape is larger, the {first} one or the {second} one?"
    return question, answer, Scene(d.image_size, tuple(shapes))


def _left_of(rng: random.Random, d: Difficulty) -> tuple[str, str, Scene]:
    first, second, answer, others = _named_pair(rng, d)
    sizes = [rng.randint(*d.shape_size) for _ in range(2)]

    def clear_gap(placed: list[Shape], new: Shape) -> bool:  # the two named shapes are clearly apart in x
        return len(placed) != 1 or abs(new.cx - placed[0].cx) >= max(sizes)

    specs = [(rng.choice(KINDS), "", size) for size in sizes] + _distractor_specs(rng, d, others)
    a, b, *rest = _place(rng, d, specs, clear_gap)
    # Colours are given after placement, so where the answer shape lies is uniform.
    left, right = sorted((a, b), key=lambda s: s.cx)
    shapes = [replace(left, colour=answer), replace(right, colour=first if answer == second else second), *rest]
    question = f"Which shape is further left, the {first} one or the {second} one?"
    return question, answer, Scene(d.image_size, tuple(shapes))


def _read_number(rng: random.Random, d: Difficulty) -> tuple[str, str, Scene]:
    text = str(rng.randrange(10**d.digits))
    h = d.digit_height
    width = _number_width(text, h)
    x, y = rng.randint(2, d.image_size - 2 - width), rng.randint(2, d.image_size - 2 - h)
    number = Number(text, x, y, h, rng.choice(_palette(d)))
    return "What number is shown in the image?", text, Scene(d.image_size, number=number)


BUILDERS: dict[str, Callable[[random.Random, Difficulty], tuple[str, str, Scene]]] = {
    "count": _count, "color_at": _color_at, "compare_size": _compare_size, "left_of": _left_of,
    "read_number": _read_number,
}


# ---- rendering ---------------------------------------------------------------------------------

def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image (no antialiasing: every shape pixel has its palette colour)."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    if scene.number is not None:
        _draw_number(draw, scene.number)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box()
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(shape.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        draw.polygon([(shape.cx, y0), (x1, shape.cy), (shape.cx, y1), (x0, shape.cy)], fill=fill)


def _draw_number(draw: ImageDraw.ImageDraw, number: Number) -> None:
    w, t, spacing = _digit_geometry(number.height)
    h, mid = number.height, number.height // 2
    for i, digit in enumerate(number.text):
        x, y = number.x + i * (w + spacing), number.y
        boxes = {"a": (x, y, x + w, y + t), "b": (x + w - t, y, x + w, y + mid), "c": (x + w - t, y + mid, x + w, y + h),
                 "d": (x, y + h - t, x + w, y + h), "e": (x, y + mid, x + t, y + h), "f": (x, y, x + t, y + mid),
                 "g": (x, y + mid - t // 2, x + w, y + mid - t // 2 + t)}
        for segment in SEGMENTS[digit]:
            x0, y0, x1, y1 = boxes[segment]
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[number.colour])


# ---- splits and streams ------------------------------------------------------------------------

def split_of(scene: Scene) -> str:
    """The one split a scene belongs to: a stable hash of its full description.

    Shapes are hashed as a sorted set: the same shapes listed in another order draw the same
    image (they never overlap), so they must land in the same split."""
    key = (scene.size, sorted(repr(s) for s in scene.shapes), scene.number)
    return SPLITS[zlib.crc32(repr(key).encode()) % 2]


def generate(split: str, num: int, seed: int = 0, tasks: Sequence[str] | None = None,
             difficulty: str | Difficulty = "easy") -> Iterator[SyntheticSample]:
    """`num` samples of `split`, the tasks taking turns (sample i has task tasks[i % len(tasks)])."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose train or test")
    chosen, d = check_tasks(tasks), resolve_difficulty(difficulty)
    for index in range(num):
        task = chosen[index % len(chosen)]
        # A string seed is hashed with SHA-512 by `random`: stable across processes and platforms.
        rng = random.Random(f"papo-synthetic:{seed}:{split}:{index}")
        while True:  # rejection keeps a scene only in its own split; answers stay balanced
            question, answer, scene = BUILDERS[task](rng, d)
            if split_of(scene) == split:
                break
        yield SyntheticSample(f"{split}_{seed}_{index:08d}", task, question, answer, scene)


def to_shard_samples(samples: Iterable[SyntheticSample]) -> Iterator[Sample]:
    """shard_writer Samples (PNG image, JSON with question, answer, task)."""
    return (s.to_shard_sample() for s in samples)
