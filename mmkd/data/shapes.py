"""A small generated image-caption dataset: coloured shapes on a background, captioned from templates.

It needs no download and is deterministic for a seed, which makes it the data of the smoke config and of the
fastest tests. Captions name the colour and the shape, so a CLIP trained on it can learn a real image-text
alignment (and zero-shot classify shapes), unlike random pixels.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "a drawing of a {color} {shape}.",
    "a small {color} {shape} on a plain background",
    "there is a {color} {shape} in the picture",
)


def draw_shape(shape: str, color: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        w = r / 2.5
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return img


def shapes_dataset(num_examples: int, image_size: int = 32, seed: int = 0):
    """A ``datasets.Dataset`` with columns ``image`` (Image), ``text`` (str) and ``label`` (ClassLabel).

    ``label`` is the shape, so the set doubles as a zero-shot classification set over ``SHAPES``.
    """
    import datasets

    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = random.Random(seed)
    images, texts, labels = [], [], []
    names = list(COLORS)
    for _ in range(num_examples):
        shape_id = rng.randrange(len(SHAPES))
        color = rng.choice(names)
        images.append(draw_shape(SHAPES[shape_id], COLORS[color], image_size, rng))
        texts.append(rng.choice(TEMPLATES).format(color=color, shape=SHAPES[shape_id]))
        labels.append(shape_id)
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(SHAPES))}
    )
    return datasets.Dataset.from_dict({"image": images, "text": texts, "label": labels}, features=features)
