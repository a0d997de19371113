"""A synthetic visual-question dataset: rendered shapes, and questions about them.

Each image (default 48x48) shows one to four shapes (circle, square, triangle) in six colours,
each in its own cell of a 3x3 grid (jittered inside the cell). Questions ask for a colour, a
kind, a count, a position, existence, or a left/right/above/below relation; every question is
asked only when its answer is unambiguous, and answers are one or two words, so exact match
is a fair score. Everything is a function of (seed, split, index): the same call writes the
same files on any machine. The held-out split uses its own seed stream and drops any scene
(shapes and cells) that also occurs in the training split.

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

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
           "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (240, 240, 240)}
KINDS = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")  # raster order of the 3x3 grid
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
MAX_SHAPES = 4
CAPTION_PROMPT = "describe the image ."
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4, in this order
TEMPLATE_WORDS = ("user", "assistant", ":", "?", ".", ",", "and")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: int  # 0..8, raster order
    cx: int  # centre in pixels
    cy: int
    r: int  # half the extent in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def make_scene(rng: random.Random, size: int = 48) -> tuple[Shape, ...]:
    cell = size // 3
    n = rng.randint(1, MAX_SHAPES)
    shapes = []
    for c in sorted(rng.sample(range(9), n)):
        r = rng.randint(max(2, cell * 5 // 16), max(2, cell * 6 // 16))  # 5..6 px at 48 px
        slack = max(0, cell // 2 - r - 1)
        cx = (c % 3) * cell + cell // 2 + rng.randint(-slack, slack)
        cy = (c // 3) * cell + cell // 2 + rng.randint(-slack, slack)
        shapes.append(Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), c, cx, cy, r))
    return tuple(shapes)


def render(scene: tuple[Shape, ...], size: int = 48, background: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for s in scene:
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)],
                         fill=fill)
    return img


def caption(scene: tuple[Shape, ...]) -> str:
    return " , ".join(f"{s.name} {CELLS[s.cell]}" for s in scene)


def _count(scene, pred) -> int:
    return sum(1 for s in scene if pred(s))


def _candidates(scene: tuple[Shape, ...], rng: random.Random) -> dict[str, tuple[str, str]]:
    """One question per applicable type, {type: (question, answer)}."""
    out = {"count": ("how many objects are there ?", str(len(scene)))}
    kind = rng.choice(KINDS)
    out["count_kind"] = (f"how many {PLURAL[kind]} are there ?",
                         str(_count(scene, lambda s: s.kind == kind)))
    colour = rng.choice(list(COLOURS))
    out["count_colour"] = (f"how many {colour} objects are there ?",
                           str(_count(scene, lambda s: s.colour == colour)))
    lone_kinds = [k for k in KINDS if _count(scene, lambda s: s.kind == k) == 1]
    if lone_kinds:
        k = rng.choice(lone_kinds)
        out["colour"] = (f"what colour is the {k} ?", next(s.colour for s in scene if s.kind == k))
    lone_colours = [c for c in COLOURS if _count(scene, lambda s: s.colour == c) == 1]
    if lone_colours:
        c = rng.choice(lone_colours)
        out["kind"] = (f"what shape is the {c} object ?",
                       next(s.kind for s in scene if s.colour == c))
    names = [s.name for s in scene]
    if rng.random() < 0.5:
        name, answer = rng.choice(names), "yes"
    else:
        absent = [f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in names]
        name, answer = rng.choice(absent), "no"
    out["exists"] = (f"is there a {name} ?", answer)
    unique = [s for s in scene if names.count(s.name) == 1]
    if unique:
        s = rng.choice(unique)
        out["where"] = (f"where is the {s.name} ?", CELLS[s.cell])
    pairs = [(a, b, rel) for a in unique for b in unique if a is not b
             for rel, (axis, _) in RELATIONS.items() if divmod(a.cell, 3)[1 - axis]
             != divmod(b.cell, 3)[1 - axis]]
    if pairs:
        a, b, rel = rng.choice(pairs)
        axis, sign = RELATIONS[rel]
        ka, kb = divmod(a.cell, 3)[1 - axis], divmod(b.cell, 3)[1 - axis]
        out["relation"] = (f"is the {a.name} {rel} the {b.name} ?",
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
    return tuple((s.colour, s.kind, s.cell) for s in scene)


def write_dataset(out_dir, n_train: int, n_test: int, seed: int = 0, size: int = 48,
                  kind: str = "qa", turns: int = 4) -> dict[str, Path]:
    """Write images and `train.jsonl` / `test.jsonl` under out_dir; returns the two paths.

    `kind` "qa" (multi-turn questions; the test split has one question per line so each is
    scored alone) or "caption". The test split never repeats a training scene.
    """
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen, paths = set(), {}
    for split, n, n_turns in (("train", n_train, turns), ("test", n_test, 1)):
        lines, i = [], 0
        while len(lines) < n:
            rng = random.Random(f"{seed}/{split}/{i}")
            i += 1
            scene = make_scene(rng, size)
            key = _scene_key(scene)
            if split == "train":
                seen.add(key)
            elif key in seen:
                continue
            name = f"images/{split}-{len(lines):06d}.png"
            render(scene, size).save(out / name)
            conv, qtype = conversation(scene, rng, kind, n_turns)
            lines.append(json.dumps({"id": f"{split}-{len(lines)}", "image": name,
                                     "type": qtype, "scene": caption(scene),
                                     "conversations": conv}))
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def vocabulary() -> list[str]:
    """Every word a synthetic conversation or template can contain (sorted, no specials)."""
    words = set(TEMPLATE_WORDS) | set(COLOURS) | set(KINDS) | set(PLURAL.values())
    words |= {w for c in CELLS for w in c.split()} | {w for r in RELATIONS for w in r.split()}
    words |= {str(i) for i in range(MAX_SHAPES + 1)} | {"yes", "no"}
    for q in ["how many objects are there ?", "what colour is the", "what shape is the object",
              "is there a", "where is the", CAPTION_PROMPT]:
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
