"""Captions for Fashion-MNIST: class names in varied natural templates, with a brightness word
derived from the image itself, and the reverse (which class a prompt names).

Brightness is the mean value of an image's garment pixels (those above the background), split at
the training set's tertiles: the darkest third may be called "dark", the brightest third "light",
the middle third gets no word.  It is what the pixels say, not a guess at colour (the images are
grayscale).
"""

from __future__ import annotations

import re

import torch

from .data import CLASS_NAMES

# Names a person would use for each class (the first is the evaluation name).
NAMES: tuple[tuple[str, ...], ...] = (
    ("T-shirt", "tee", "top", "short-sleeved top"),
    ("pair of trousers", "pair of pants", "pair of jeans", "pair of slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "summer dress"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "strappy sandal", "summer sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
assert len(NAMES) == len(CLASS_NAMES)

BRIGHTNESS: tuple[tuple[str, ...], ...] = (("dark", "black"), (), ("light", "white", "pale"))

TEMPLATES: tuple[str, ...] = (
    "a photo of {a}", "{a}", "{x}", "a picture of {a}", "an image of {a}",
    "a grayscale photo of {a}", "{a} on a black background", "a product photo of {a}",
    "a small photo of {a}", "fashion item: {x}", "a low-resolution image of {a}", "this is {a}",
)
EVAL_TEMPLATE = "a photo of {a}"


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def render(template: str, phrase: str) -> str:
    return template.format(a=_article(phrase), x=phrase)


def eval_prompt(class_id: int) -> str:
    """The prompt that evaluations use for a class: ``a photo of a <name>``."""
    if not 0 <= class_id < len(NAMES):
        raise ValueError(f"class id {class_id} out of range 0..{len(NAMES) - 1}")
    return render(EVAL_TEMPLATE, NAMES[class_id][0])


def all_captions() -> list[str]:
    """Every caption training can draw, the empty caption (CFG's null) first; the order is fixed."""
    out = [""]
    for names in NAMES:
        for tone in BRIGHTNESS:
            phrases = [f"{w} {n}" for w in tone for n in names] if tone else list(names)
            out.extend(render(t, p) for t in TEMPLATES for p in phrases)
    return list(dict.fromkeys(out))


def caption_table() -> tuple[list[str], list[list[list[int]]]]:
    """(captions, index) where ``index[class][tone]`` lists the caption ids for that class and
    brightness tertile (0 dark, 1 middle, 2 light).  The middle tertile only gets plain names;
    the outer ones get their word half the time (the plain captions are listed twice there, so a
    dark or light image is described by its brightness in half of its captions)."""
    captions = all_captions()
    pos = {c: i for i, c in enumerate(captions)}
    index = []
    for names in NAMES:
        plain = [pos[render(t, n)] for t in TEMPLATES for n in names]
        per_tone = []
        for tone in BRIGHTNESS:
            worded = [pos[render(t, f"{w} {n}")] for t in TEMPLATES for w in tone for n in names]
            per_tone.append(plain * 2 + worded if tone else plain)
        index.append(per_tone)
    return captions, index


def garment_brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean value (in [-1, 1]) of the pixels above the background, per image (N,)."""
    fg = images > -0.8
    total = (images * fg).flatten(1).sum(1)
    return total / fg.flatten(1).sum(1).clamp(min=1)


def brightness_tertiles(images: torch.Tensor) -> torch.Tensor:
    """0 (darkest third), 1, 2 (brightest third) per image, split at these images' tertiles."""
    b = garment_brightness(images)
    lo, hi = torch.quantile(b, torch.tensor([1 / 3, 2 / 3]))
    return (b > lo).long() + (b > hi).long()


# Words a prompt may use for a class besides NAMES (plurals are matched for every name).
ALIASES: dict[int, tuple[str, ...]] = {0: ("t shirt", "tshirt"), 1: ("trouser", "pants", "jeans", "slacks"),
                                       7: ("shoe",), 9: ("bootie",)}
_PATTERNS = sorted({(n.lower(), c) for c, names in enumerate(NAMES) for n in names}
                   | {(n.lower(), c) for c, names in ALIASES.items() for n in names}
                   | {(n.lower(), c) for c, n in enumerate(CLASS_NAMES)}, key=lambda p: -len(p[0]))


def class_named(prompt: str) -> int | None:
    """The class a prompt names (the longest name found wins: "T-shirt" is not "shirt"), or
    None when it names none.  Also accepts the dataset's own class names and plurals."""
    text = prompt.lower()
    for name, c in _PATTERNS:
        if re.search(rf"(?<![\w-]){re.escape(name)}(?:s|es)?(?![\w-])", text):
            return c
    return None
