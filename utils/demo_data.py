"""Generate captioned pictures of coloured shapes: the demo's data and the tests' data, in a user's folder format."""

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 205, 40), "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "middle", "right")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str


def base_caption(scene: Scene) -> str:
    """The caption style the demo's base model is pretrained on."""
    return f"a {scene.colour} {scene.shape} on the {scene.position}"


def user_captions(scene: Scene, third: int = 0) -> list[str]:
    """The user's own style: three reference captions per picture, as in COCO; `third` picks the third one's phrasing.

    The two third phrasings are drawn at random per picture, so no two ways of going on from a shared beginning are
    equally frequent: with the same three phrasings for every picture, "... is red" then [SEP] or "in colour" were a
    coin toss the model learnt exactly, and greedy captions in bf16 and fp32 flipped on it."""
    where = "in the middle" if scene.position == "middle" else f"on the {scene.position}"
    thirds = (f"the {scene.shape} {where} is {scene.colour} in colour", f"there is one {scene.colour} {scene.shape} {where}")
    return [
        f"the {scene.shape} {where} is {scene.colour}",
        f"{where} there is one {scene.colour} {scene.shape}",
        thirds[third],
    ]


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    import math

    points = []
    for k in range(10):  # a five-pointed star
        radius = r if k % 2 == 0 else r * 0.45
        angle = math.pi * k / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_scene(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """One shape on a noisy light background; position, size and shade jitter so no two pictures match."""
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.13, 0.19)
    cx = size * {"left": 0.2, "middle": 0.5, "right": 0.8}[scene.position] + rng.uniform(-0.05, 0.05) * size
    cy = size * rng.uniform(0.3, 0.7)
    colour = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r), fill=colour)
    for _ in range(size // 4):  # speckles, so the model has to find the shape
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randint(120, 255) for _ in range(3)))
    return image


def write_split(folder: Path, count: int, rng: random.Random, size: int = 64) -> list[tuple[str, Scene]]:
    """Write `count` pictures (PNG) covering every scene in turn; returns (file name, scene) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = all_scenes()
    rng.shuffle(scenes)
    written = []
    for index in range(count):
        scene = scenes[index % len(scenes)]
        name = f"img_{index:05d}.png"
        draw_scene(scene, rng, size).save(folder / name)
        written.append((name, scene))
    return written


def write_captions_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "caption"])
        writer.writerows(rows)


def write_demo_dataset(root: Path, train_count: int, test_count: int, seed: int = 0, size: int = 64) -> Path:
    """root/train, root/test and root/captions.csv (names like train/img_00000.png, 3 captions each)."""
    rng = random.Random(seed)
    rows = []
    for split, count in (("train", train_count), ("test", test_count)):
        for name, scene in write_split(root / split, count, rng, size):
            rows += [(f"{split}/{name}", caption) for caption in user_captions(scene, rng.randrange(2))]
    write_captions_csv(root / "captions.csv", rows)
    return root


def every_caption() -> list[str]:
    """All captions either style can produce: the vocabulary of the demo's tokenizer."""
    return [c for scene in all_scenes() for c in [base_caption(scene), *user_captions(scene, 0), *user_captions(scene, 1)]]


def generate_base_examples(count: int, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, str]]:
    """`count` in-memory pictures captioned in the base style, every scene in turn: the base model's pretraining set."""
    rng = random.Random(seed)
    scenes = all_scenes()
    rng.shuffle(scenes)
    examples = []
    for index in range(count):
        scene = scenes[index % len(scenes)]
        examples.append((draw_scene(scene, rng, size), base_caption(scene)))
    return examples
