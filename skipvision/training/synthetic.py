"""A synthetic visual-question dataset: rendered shapes, and questions about them.

Each image (default 96x96) shows two to four shapes (circle, square, triangle) in distinct
colours out of six, each in its own quarter of the image (a 2x2 grid), placed anywhere inside
it on the patch lattice. Questions ask for the colour of the object in a cell, the kind or the
cell of the object of a colour, a count (all objects, or of one kind), existence of a colour,
or a left/right/above/below relation between two coloured objects; answers are one or two
words, so exact match is a fair score. Everything is a function of (seed, split, index): the
same call writes the same files on any machine. The held-out split uses its own seed stream
and drops any image that also occurs in the training split.

Two kinds of conversations, as in LLaVA's two stages: a `caption` ("describe the image .",
answered by listing the shapes in raster order) for stage 1, and multi-turn question answering
for stage 2 (SFT). `build_tokenizer` makes a word-level `tokenizer.json` over exactly this
vocabulary plus the special tokens, consistent with the llava-hf template
`USER: <image>\\n{question} ASSISTANT:`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import ConfigError

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
           "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (240, 240, 240)}
KINDS = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
GRID = 2  # cells per side
CELLS = ("top left", "top right", "bottom left", "bottom right")  # raster order
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
SHAPES = (2, 4)  # fewest and most shapes per scene; (1, 1) for a curriculum's first stage
MAX_SHAPES = SHAPES[1]
CAPTION_PROMPT = "describe the image ."
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4, in this order
TEMPLATE_WORDS = ("user", "assistant", ":", "?", ".", ",", "and")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: int  # 0..GRID*GRID-1, raster order
    x: int  # top-left corner of the shape's box, pixels
    y: int
    side: int  # box side, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def make_scene(rng: random.Random, size: int = 96, shapes: tuple[int, int] = SHAPES
               ) -> tuple[Shape, ...]:
    """shapes[0]..shapes[1] shapes in distinct colours, one per cell of a 2x2 grid. A shape
    is a square box of size/4 px (24 px at 96 px: 3x3 patches of the shipped model's 8 px
    patch) on a lattice of size/12 px, anywhere in its cell. Distinct colours make "the red
    object" a name, so questions can refer to a shape by its colour or by its cell."""
    unit, cell = size // 12, size // GRID
    n = rng.randint(*shapes)
    cells, colours = sorted(rng.sample(range(GRID * GRID), n)), rng.sample(list(COLOURS), n)
    out = []
    for c, colour in zip(cells, colours):
        side = 3 * unit
        x = (c % GRID) * cell + unit * rng.randint(0, (cell - side) // unit)
        y = (c // GRID) * cell + unit * rng.randint(0, (cell - side) // unit)
        out.append(Shape(colour, rng.choice(KINDS), c, x, y, side))
    return tuple(out)


def render(scene: tuple[Shape, ...], size: int = 96, background: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for s in scene:
        x1, y1 = s.x + s.side - 1, s.y + s.side - 1  # inclusive
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((s.x, s.y, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((s.x, s.y, x1, y1), fill=fill)
        else:
            draw.polygon([((s.x + x1) / 2, s.y), (s.x, y1), (x1, y1)], fill=fill)
    return img


def caption(scene: tuple[Shape, ...]) -> str:
    return " , ".join(f"{s.name} {CELLS[s.cell]}" for s in scene)


def _count(scene, pred) -> int:
    return sum(1 for s in scene if pred(s))


def _candidates(scene: tuple[Shape, ...], rng: random.Random) -> dict[str, tuple[str, str]]:
    """One question per type, {type: (question, answer)}. A shape is named by its colour
    (unique in a scene) or by its cell; kinds are asked for and counted, never used as names."""
    by_colour = {s.colour: s for s in scene}
    s = rng.choice(scene)
    out = {"count": ("how many objects are there ?", str(len(scene))),
           "colour": (f"what colour is the object at the {CELLS[s.cell]} ?", s.colour)}
    kind = rng.choice(KINDS)
    out["count_kind"] = (f"how many {PLURAL[kind]} are there ?",
                         str(_count(scene, lambda s: s.kind == kind)))
    s = rng.choice(scene)
    out["kind"] = (f"what shape is the {s.colour} object ?", s.kind)
    s = rng.choice(scene)
    out["where"] = (f"where is the {s.colour} object ?", CELLS[s.cell])
    colour = rng.choice(list(COLOURS))
    out["exists"] = (f"is there a {colour} object ?", "yes" if colour in by_colour else "no")
    pairs = [(a, b, rel) for a in scene for b in scene if a is not b
             for rel, (axis, _) in RELATIONS.items() if divmod(a.cell, GRID)[1 - axis]
             != divmod(b.cell, GRID)[1 - axis]]
    if pairs:
        a, b, rel = rng.choice(pairs)
        axis, sign = RELATIONS[rel]
        ka, kb = divmod(a.cell, GRID)[1 - axis], divmod(b.cell, GRID)[1 - axis]
        out["relation"] = (f"is the {a.colour} object {rel} the {b.colour} object ?",
                           "yes" if (ka - kb) * sign > 0 else "no")
    return out


def conversation(scene, rng: random.Random, kind: str, turns: int) -> tuple[list[dict], str]:
    """LLaVA-style turns for one image, and the type of the first question."""
    if kind == "caption":
        pairs, first = [(CAPTION_PROMPT, caption(scene))], "caption"
    else:
        cand = _candidates(scene, rng)
        types = rng.sample(sorted(cand), min(turns, len(cand)))
        pairs, first = [cand[t] for t in types], types[0]
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return conv, first


def _scene_key(scene) -> tuple:
    return tuple((s.colour, s.kind, s.x, s.y, s.side) for s in scene)


def scenes(n_train: int, n_test: int, seed: int = 0, size: int = 96,
           shapes: tuple[int, int] = SHAPES):
    """(split, index, rng, scene) for the training then the held-out scenes; rng is the
    scene's own generator, ready to draw its questions. A held-out scene that is also a
    training one (the same image) is skipped: at 2..4 shapes that is rare, so the held-out
    split has the training split's distribution (no shift towards harder scenes)."""
    seen = set()
    for split, n in (("train", n_train), ("test", n_test)):
        i = k = 0
        while k < n:
            rng = random.Random(f"{seed}/{split}/{i}")
            i += 1
            scene = make_scene(rng, size, shapes)
            key = _scene_key(scene)
            if split == "train":
                seen.add(key)
            elif key in seen:
                continue
            yield split, k, rng, scene
            k += 1


def write_dataset(out_dir, n_train: int, n_test: int, seed: int = 0, size: int = 96,
                  kind: str = "qa", turns: int = 4, shapes: tuple[int, int] = SHAPES,
                  splits: tuple[str, ...] = ("train", "test")) -> dict[str, Path]:
    """Write images and `train.jsonl` / `test.jsonl` under out_dir; returns their paths.

    `kind` "qa" (multi-turn questions; the test split has one question per line so each is
    scored alone) or "caption". The test split never repeats a training image. `shapes`
    (fewest, most) per scene; (1, 1) makes the easy scenes of a curriculum's first stage.
    `splits` names the files to write: ("test",) rebuilds the held-out split alone, the same
    as in a full call (the training scenes are still drawn, not rendered).
    """
    if kind not in ("qa", "caption"):
        raise ConfigError(f"kind must be 'qa' or 'caption', got {kind!r}")
    if not splits or set(splits) - {"train", "test"}:
        raise ConfigError(f"splits must name 'train' and/or 'test', got {splits!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = {split: [] for split in splits}
    for split, k, rng, scene in scenes(n_train, n_test, seed, size, shapes):
        if split not in lines:
            continue
        name = f"images/{split}-{k:06d}.png"
        render(scene, size).save(out / name)
        conv, qtype = conversation(scene, rng, kind, turns if split == "train" else 1)
        lines[split].append(json.dumps({"id": f"{split}-{k}", "image": name, "type": qtype,
                                        "scene": caption(scene), "conversations": conv}))
    paths = {}
    for split, rows in lines.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(r + "\n" for r in rows))
    return paths


def vocabulary() -> list[str]:
    """Every word a synthetic conversation or template can contain (sorted, no specials)."""
    words = set(TEMPLATE_WORDS) | set(COLOURS) | set(KINDS) | set(PLURAL.values())
    words |= {w for c in CELLS for w in c.split()} | {w for r in RELATIONS for w in r.split()}
    words |= {str(i) for i in range(MAX_SHAPES + 1)} | {"yes", "no"}
    for q in ["how many objects are there ?", "what colour is the object at the",
              "what shape is the object", "is there a", "where is the", CAPTION_PROMPT]:
        words |= set(q.split())
    return sorted(words)


def build_tokenizer(words=None):
    """A word-level `tokenizers.Tokenizer`: lowercase, split on spaces and punctuation.

    Ids 0..4 are <unk> <s> </s> <pad> <image>; encoding prepends <s> as LLaMA's does.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words if words is not None else vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tok
