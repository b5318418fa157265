"""CLIP-like pre-training pairs for the shapes world: windows of its scenes, captioned.

CLIP learnt from whole web images with free-form captions, so it has embeddings for walls,
textures, half objects and crowded scenes. This module makes the shapes world's analogue for the
tiny teacher (``demo/tiny_clip.py``, ``TeacherSpec.data = "scenes"``):

* whole scenes and random windows of scenes, captioned with what is visible in them: objects
  that lie whole in the window, cut-off ones ("half a blue square", "part of a red star"), and
  the background;
* windows on part of an object (what most detector proposals are);
* background-only windows, captioned by their texture ("a dark noisy striped background.");
* object crops at several context scales (1x to 2x the object's box).

Scenes hold objects of every category, base and novel, uniformly (as every LVIS category
appears somewhere on CLIP's web). A window's caption is made from what its pixels contain
(:func:`visible_in_window`, the objects' visible masks); the sentence around it comes from a small
grammar (:func:`caption`). Everything is a function of the seed.

Shape shorthand: S = scene size in pixels, s = the teacher's input size, N = pairs.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from vild_d2.data.datasets.shapes import WorldSpec, background_texture, draw_scene, visible_box
from vild_d2.distill.crops import fast_crops
from vild_d2.text.prompts import article, fill_prompts, load_templates

__all__ = [
    "WHOLE",
    "MOST",
    "HALF",
    "Seen",
    "Mixture",
    "CaptionPairs",
    "visible_in_window",
    "texture_words",
    "caption",
    "scene_with_texture",
    "caption_pairs",
]

# Shares of an object's visible pixels inside a window that make it whole / mostly / half in it.
WHOLE, MOST, HALF = 0.9, 0.6, 0.35
# A cut-off object is named only if it shows at least this share of the window: a sliver at
# the edge is there, but too little of it to say what it is (a background caption may say its
# colour). Nothing under MIN_PIXELS pixels counts.
MIN_PIXELS, MIN_SHARE = 8, 0.25
MAX_ITEMS = 4  # more visible objects than this: name the largest 3 and "more shapes"

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words for a cut-off object by how much of it is inside (every one is true of its range).
_CUT = {
    "most": ("most of", "part of"),
    "half": ("half", "half of", "part of"),
    "part": ("part of", "a piece of", "the edge of", "a corner of"),
}


@dataclass(frozen=True)
class Seen:
    """An object as a window shows it: ``pixels`` of its visible pixels are in the window, a
    ``fraction`` of all of them, a ``share`` of the window."""

    name: str
    pixels: int
    fraction: float
    share: float

    @property
    def nameable(self) -> bool:
        """Whole, or enough of it to say what it is."""
        return self.fraction >= WHOLE or self.share >= MIN_SHARE

    @property
    def extent(self) -> str:
        """ "whole", "most", "half" or "part"."""
        if self.fraction >= WHOLE:
            return "whole"
        return "most" if self.fraction >= MOST else "half" if self.fraction >= HALF else "part"


def visible_in_window(
    objects: Sequence[Tuple[str, np.ndarray]], window: Sequence[int]
) -> List[Seen]:
    """
    What a window shows of each object.

    Args:
        objects: (name, visible mask (S, S) bool) per object.
        window: integer XYXY pixel box (x0, y0, x1, y1).

    Returns:
        One :class:`Seen` per object with at least ``MIN_PIXELS`` pixels in the window, largest
        in it first.
    """
    x0, y0, x1, y1 = (int(v) for v in window)
    area = (x1 - x0) * (y1 - y0)
    seen = []
    for name, mask in objects:
        total = int(mask.sum())
        inside = int(mask[y0:y1, x0:x1].sum())
        if total and inside >= MIN_PIXELS:
            seen.append(Seen(name, inside, inside / total, inside / area))
    return sorted(seen, key=lambda o: -o.pixels)


def texture_words(texture: dict, side: float) -> str:
    """
    Words for what a window of ``side`` (a fraction of the scene's side) shows of a background
    ``texture`` (:func:`background_texture`'s): its tone, its grain, and its pattern if the
    window is large enough to see it (a full stripe period, a gradient step >= 15 grey levels).
    """
    base = texture["base"]
    words = ["dark" if base < 100 else "light" if base > 150 else "grey"]
    if texture["noise"] >= 15:
        words.append("noisy")
    elif texture["noise"] <= 7:
        words.append("smooth")
    kind = texture["kind"]
    if kind == "plain":
        words.append("plain")
    elif kind == "gradient" and texture["amplitude"] * side >= 15:
        words.append("gradient")
    elif kind in ("stripes", "checker") and side >= texture["period"]:
        words.append("striped" if kind == "stripes" else "checkered")
    return " ".join(words)


def _plural(name: str) -> str:
    return name + ("es" if name.endswith("s") else "s")


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# Detection-style prompts are one caption form among many for a lone whole object, as
# "a photo of a dog" is one kind of alt-text among many. Not "many {}": it would be false here.
_TEMPLATES = [t for t in load_templates() if "many" not in t]


def caption(
    rng: np.random.Generator,
    seen: Sequence[Seen],
    background: Optional[str] = None,
    background_share: float = 0.0,
    max_items: int = MAX_ITEMS,
) -> str:
    """
    One caption, drawn from the grammar, of a window showing ``seen`` (largest first; the
    nameable ones are named) on a background described by ``background``
    (:func:`texture_words`; None = unknown) that covers ``background_share`` of the window.

    Object phrases: "a red star", "two blue circles" (whole ones, counted by category), "half a
    green cross", "most of a yellow heart", "part of / a piece of / the edge of / a corner of an
    orange square" (cut-off ones); more than ``max_items`` phrases: the ``max_items - 1`` of the
    largest objects and "more shapes". Sentences: "{list}.", "a photo of {list}.", "a picture of
    {list}.", "an image showing {list}.", "{list} on a {background} background.", "{n} shapes:
    {list}." (only whole ones), "a close-up of {object}.", a ViLD prompt for a lone whole
    object; nothing nameable:
    "a {background} background.", "a {background} texture.", "an empty {background}
    background.", "nothing but a {background} background.", or with slivers of objects "a
    {background} background with a bit of {colour}.".
    """
    slivers = [o for o in seen if not o.nameable]
    seen = [o for o in seen if o.nameable]
    if not seen:
        if slivers:
            colour = slivers[0].name.split(" ")[0]
            forms = [
                f"a {{}} background with a bit of {colour}.",
                f"a {{}} background and the edge of something {colour}.",
            ]
        else:
            forms = [
                "a {} background.",
                "a {} texture.",
                "an empty {} background.",
                "nothing but a {} background.",
                "a photo of a {} background.",
            ]
        # Texture unknown (a picture from elsewhere): no words for it.
        return " ".join(str(rng.choice(forms)).format(background or "").split())
    whole = {}
    for o in seen:
        if o.extent == "whole":
            whole[o.name] = whole.get(o.name, 0) + 1
    phrases, done = [], set()
    for o in seen:  # largest first, so a truncated list keeps the most visible objects
        if o.extent == "whole":
            if o.name in done:
                continue
            done.add(o.name)
            n = whole[o.name]
            phrases.append(
                f"{article(o.name)} {o.name}" if n == 1 else f"{_NUMBERS[n]} {_plural(o.name)}"
            )
        else:
            word = str(rng.choice(_CUT[o.extent]))
            phrases.append(f"{word} {article(o.name)} {o.name}")
    truncated = len(phrases) > max_items
    if truncated:
        phrases = phrases[: max(1, max_items - 1)]
    if rng.random() < 0.5:  # captions on the web do not list things by size
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    listed = _join(phrases + ["more shapes"] if truncated else phrases)
    forms = ["{}.", "a photo of {}.", "a picture of {}.", "an image showing {}."]
    if background is not None and background_share >= 0.3:
        forms += [
            "{} on a " + background + " background.",
            "a photo of {} on a " + background + " background.",
        ]
    all_whole = all(o.extent == "whole" for o in seen) and not truncated
    count = sum(whole.values())
    if all_whole and count >= 2:
        forms.append(f"{_NUMBERS[count]} shapes: {{}}.")
    if len(seen) == 1:
        forms.append("a close-up of {}.")
        if all_whole:
            return (
                str(rng.choice(fill_prompts(seen[0].name, _TEMPLATES)))
                if rng.random() < 0.3
                else str(rng.choice(forms)).format(listed)
            )
    return str(rng.choice(forms)).format(listed)


def scene_with_texture(
    rng: np.random.Generator, world: WorldSpec, names: Sequence[str]
) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray, np.ndarray]], dict]:
    """
    :func:`draw_scene` of ``names``, plus the texture of its background.

    ``draw_scene`` paints the background first, so replaying ``rng`` from before the call
    through :func:`background_texture` gives that background and its texture; the pixels no
    object covers are checked to be that background.

    Returns:
        image (S, S, 3) uint8, objects (name, polygon, visible mask) as ``draw_scene``'s,
        texture (a dict, see ``background_texture``).
    """
    state = copy.deepcopy(rng.bit_generator.state)
    image, objects = draw_scene(rng, world, list(names))
    replay = np.random.Generator(type(rng.bit_generator)())
    replay.bit_generator.state = state
    background, texture = background_texture(replay, world.image_size)
    bare = np.ones(image.shape[:2], bool)
    for _, _, mask in objects:
        bare &= ~mask
    if not np.array_equal(image[bare], background[bare]):
        raise RuntimeError("draw_scene no longer paints its background first; fix the replay")
    return image, objects, texture


_TOKENIZER = None


def _fitting(rng, seen, words, share, max_tokens: Optional[int]) -> str:
    """A :func:`caption` of at most ``max_tokens`` BPE tokens (None = any length)."""
    global _TOKENIZER
    text = caption(rng, seen, words, share)
    if max_tokens is None:
        return text
    if _TOKENIZER is None:
        from clip.simple_tokenizer import SimpleTokenizer

        _TOKENIZER = SimpleTokenizer()
    tries = 0
    while len(_TOKENIZER.encode(text)) > max_tokens:
        tries += 1
        # A long caption is long because of its many objects: after a few draws, name fewer
        # of them and say "more shapes" (the largest are kept).
        items = MAX_ITEMS if tries < 8 else max(2, MAX_ITEMS - (tries - 7))
        text = caption(rng, seen, words, share, max_items=items)
    return text


@dataclass
class CaptionPairs:
    """N windows with captions.

    crops: (N, 3, s, s) float16, CLIP-normalised (as :func:`fast_crops` makes them).
    captions: N lists of caption variants (each true of its window).
    windows: (N, 4) int64 XYXY windows in their scene; scenes: (N,) int64 scene index.
    kinds: N of "object" (object-centred crop), "part", "window" (random), "background".
    """

    crops: torch.Tensor
    captions: List[List[str]]
    windows: np.ndarray
    scenes: np.ndarray
    kinds: List[str]


def _square(box: np.ndarray, scale: float, size: int) -> np.ndarray:
    """The integer square window :func:`fast_crops` samples for ``box`` (XYXY) at context
    ``scale``: the box enlarged about its centre, clipped to the image, its centred square."""
    centre = (box[:2] + box[2:]) / 2
    half = (box[2:] - box[:2]) / 2 * scale
    lo, hi = np.clip(centre - half, 0, size), np.clip(centre + half, 0, size)
    side = max(2, int(round(float((hi - lo).min()))))
    mid = (lo + hi) / 2
    x0, y0 = (int(np.clip(round(float(v) - side / 2), 0, size - side)) for v in mid)
    return np.array([x0, y0, x0 + side, y0 + side])


def _random_square(rng: np.random.Generator, lo: float, hi: float, size: int) -> np.ndarray:
    side = max(4, int(round(rng.uniform(lo, hi) * size)))
    x0, y0 = rng.integers(0, size - side + 1, size=2)
    return np.array([x0, y0, x0 + side, y0 + side])


@dataclass(frozen=True)
class Mixture:
    """What :func:`caption_pairs` takes from each scene."""

    # One object-centred crop per object and range: box jittered, context scale drawn in it.
    object_scales: Tuple[Tuple[float, float], ...] = ((1.0, 1.5), (1.5, 2.0))
    part: float = 0.5  # chance of a window on part of an object (smaller than it)
    window: float = 0.5  # chance of a random window (side 15% to 100%; 15% of them the scene)
    background: float = 1.0  # chance of a background-only window (when one is found)
    empty: float = 0.08  # share of scenes without objects (3 windows each)


def _scene_windows(rng, objects, size: int, mix: Mixture) -> List[Tuple[np.ndarray, str]]:
    """The windows taken from one scene (see :class:`Mixture`)."""
    windows = []
    masks = [m for _, _, m in objects]
    for mask in masks:
        if mask.sum() < 16:
            continue
        x0, y0, x1, y1 = visible_box(mask)
        w, h = x1 - x0, y1 - y0
        for lo, hi in mix.object_scales:
            box = np.array([x0, y0, x1, y1], np.float64)
            box += rng.uniform(-0.1, 0.1, size=4) * [w, h, w, h]
            windows.append((_square(box, float(rng.uniform(lo, hi)), size), "object"))
    big = [m for m in masks if m.sum() >= 40]
    if big and rng.random() < mix.part:  # centred on one of an object's pixels, smaller
        mask = big[rng.integers(len(big))]
        x0, y0, x1, y1 = visible_box(mask)
        side = max(4, int(round(rng.uniform(0.3, 0.7) * max(x1 - x0, y1 - y0))))
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(xs))
        cx = int(np.clip(xs[k] - side // 2, 0, size - side))
        cy = int(np.clip(ys[k] - side // 2, 0, size - side))
        windows.append((np.array([cx, cy, cx + side, cy + side]), "part"))
    if rng.random() < mix.window:
        if rng.random() < 0.15:
            windows.append((np.array([0, 0, size, size]), "window"))
        else:
            windows.append((_random_square(rng, 0.15, 1.0, size), "window"))
    if rng.random() < mix.background:
        for _ in range(8):  # background between the objects, if there is room
            window = _random_square(rng, 0.1, 0.4, size)
            x0, y0, x1, y1 = window
            if not any(m[y0:y1, x0:x1].any() for m in masks):
                windows.append((window, "background"))
                break
    return windows


def caption_pairs(
    world: WorldSpec,
    count: int,
    size: int,
    seed: int,
    variants: int = 4,
    max_tokens: Optional[int] = None,
    mixture: Mixture = Mixture(),
) -> CaptionPairs:
    """
    ``count`` image-caption pairs from the world's distribution (see the module docstring).

    Scenes hold 1 to 6 objects of categories drawn uniformly from all of ``world.classes``;
    ``mixture`` says which windows each gives, and how many scenes are bare backgrounds (3
    windows each, of 10% to 100% of the picture). Each window gets ``variants`` captions drawn
    independently
    from the grammar; with ``max_tokens``, captions longer than that many BPE tokens are drawn
    again (then made of fewer objects), so that none is cut by the text tower's context.

    Returns:
        :class:`CaptionPairs` with exactly ``count`` pairs, deterministic in (world, seed).
    """
    rng = np.random.default_rng([world.seed, seed, 23])
    classes = list(world.classes)
    s_img = world.image_size
    crops, captions, windows, scenes, kinds = [], [], [], [], []
    scene = 0
    while len(kinds) < count:
        if rng.random() < mixture.empty:
            image, texture = background_texture(rng, s_img)
            objects = []
            chosen = [(_random_square(rng, 0.1, 1.0, s_img), "background") for _ in range(3)]
        else:
            names = [classes[i] for i in rng.integers(len(classes), size=rng.integers(1, 7))]
            image, objects, texture = scene_with_texture(rng, world, names)
            chosen = _scene_windows(rng, objects, s_img, mixture)
        named = [(n, m) for n, _, m in objects]
        covered = np.zeros((s_img, s_img), bool)
        for _, m in named:
            covered |= m
        for window, kind in chosen:
            x0, y0, x1, y1 = window
            seen = visible_in_window(named, window)
            share = 1.0 - covered[y0:y1, x0:x1].mean()
            words = texture_words(texture, (x1 - x0) / s_img)
            captions.append(
                [_fitting(rng, seen, words, share, max_tokens) for _ in range(variants)]
            )
            windows.append(window)
            scenes.append(scene)
            kinds.append(kind)
        rgb = torch.from_numpy(image).permute(2, 0, 1)
        boxes = torch.from_numpy(np.stack([w for w, _ in chosen])).float()
        crops.append(fast_crops(rgb, boxes, (1.0,), size).half())
        scene += 1
    return CaptionPairs(
        crops=torch.cat(crops)[:count],
        captions=captions[:count],
        windows=np.stack(windows)[:count].astype(np.int64),
        scenes=np.array(scenes[:count], np.int64),
        kinds=kinds[:count],
    )
