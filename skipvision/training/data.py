"""Conversation data in LLaVA's JSONL format, tokenised for training, and exact-match scoring.

One JSON object per line (blank lines are ignored):

    {"id": "a1", "image": "images/a1.png", "type": "colour",
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the circle ?"},
                       {"from": "gpt", "value": "red"}, ...more human/gpt pairs...]}

`image` is relative to the JSONL file's folder unless absolute; `type` is optional (it groups
the evaluator's scores). Turns alternate human, gpt. The first human turn holds `<image>`
when there is an image. The prompt follows the llava-hf template: `USER: <image>\\n{q}
ASSISTANT: {a}</s>USER: {q2} ASSISTANT: ...`. Training labels are the answers and their `</s>`;
everything else is -100 (no loss).

Bad lines (malformed JSON, missing fields, a missing or unreadable image, an empty answer, a
conversation longer than the context) are all found before training starts and reported
together with their line numbers: `DataError` stops the run, or with `skip_bad=True` they are
left out and listed in `ConversationData.problems`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..io.images import load_image
from ..io.processor import TEMPLATES
from ..errors import SkipvisionError
from ..kv_cache import left_pad

IGNORE = -100  # label of a position that carries no loss (PyTorch's cross_entropy default)


class DataError(SkipvisionError):
    """Problems found in a data file; `problems` is a list of (line number, message)."""

    def __init__(self, path, problems: list[tuple[int, str]], hint: str = ""):
        self.path, self.problems = path, problems
        shown = "\n".join(f"  {path}:{line}: {msg}" for line, msg in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} bad record(s) in {path}:\n{shown}{more}{hint}")


@dataclass
class Record:
    line: int  # 1-based line in the JSONL file
    id: str
    image: Path | None
    turns: list[tuple[str, str]]  # (question, answer); <image> stays where it was
    type: str = ""


def parse_line(text: str, root: Path) -> Record:
    """One JSONL line -> Record (line number 0: the caller sets it); ValueError says why not."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise ValueError("expected an object with a 'conversations' list")
    conv = obj["conversations"]
    if not conv or len(conv) % 2:
        raise ValueError(f"'conversations' needs human/gpt pairs, got {len(conv)} turn(s)")
    turns = []
    for i in range(0, len(conv), 2):
        q, a = conv[i], conv[i + 1]
        if not (isinstance(q, dict) and isinstance(a, dict) and q.get("from") == "human"
                and a.get("from") == "gpt"):
            raise ValueError(f"turns {i}, {i + 1} must be from 'human' then 'gpt'")
        q, a = q.get("value"), a.get("value")
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f"turns {i}, {i + 1} need string values")
        if not a.strip():
            raise ValueError(f"empty answer in turn {i + 1}")
        turns.append((q, a))
    image = obj.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise ValueError(f"'image' must be a file path, got {image!r:.60}")
    n_tags = sum(q.count("<image>") for q, _ in turns)
    if image is not None and (n_tags != 1 or "<image>" not in turns[0][0]):
        raise ValueError(f"with an image, the first question must hold one <image> "
                         f"(found {n_tags} in the conversation)")
    if image is None and n_tags:
        raise ValueError("<image> in the conversation but no 'image' field")
    turns = [(q.strip(), a.strip()) for q, a in turns]
    path = None if image is None else (root / image if not Path(image).is_absolute() else
                                       Path(image))
    return Record(0, str(obj.get("id", "")), path, turns, str(obj.get("type", "")))


def read_jsonl(path, image_root=None) -> tuple[list[Record], list[tuple[int, str]]]:
    """Records and problems [(line, message)] of a JSONL file; images checked to exist."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records, problems = [], []
    if not path.is_file():
        raise DataError(path, [(0, "no such file")])
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((n, f"not UTF-8 text (byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                rec = parse_line(text, root)
                if rec.image is not None:
                    check_image(rec.image)
            except ValueError as e:
                problems.append((n, str(e)))
                continue
            rec.line = n
            records.append(rec)
    return records, problems


def check_image(path: Path):
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} not found")
    try:
        with Image.open(path) as im:  # reads the header only
            im.size
    except Exception as e:  # PIL raises many types for a bad file
        raise ValueError(f"image {str(path)!r} is not a readable image ({e})") from None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode(record: Record, processor, answers: bool = True) -> Encoded:
    """Token ids (image expanded, BOS as the tokenizer adds it) and labels on answers + </s>.

    answers=False gives the first question's prompt alone (for generation and evaluation).
    """
    tok = processor.tokenizer
    eos = processor.cfg.text.eos_ids[0]
    ids, labels = [], []
    for i, (q, a) in enumerate(record.turns):
        if i == 0:  # the processor's template and BOS; a text-only prompt has no <image>
            p = processor.encode(processor.format(q) if record.image is not None else
                                 TEMPLATES[processor.template].format(question=q))
        else:  # later turns: llava and vicuna_v1 alike
            p = tok.encode(f"USER: {q} ASSISTANT:", add_special_tokens=False).ids
        ids += p
        labels += [IGNORE] * len(p)
        if not answers:
            break
        ans = tok.encode(a, add_special_tokens=False).ids + [eos]
        ids += ans
        labels += ans
    return Encoded(ids, labels)


@dataclass
class ConversationData:
    """A validated JSONL file: records, their encodings, and images loaded on demand."""
    path: Path
    records: list[Record]
    encoded: list[Encoded]
    processor: object
    problems: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, i: int) -> torch.Tensor | None:
        """(3, S, S) preprocessed image of record i (None without one); DataError names the line."""
        rec = self.records[i]
        if rec.image is None:
            return None
        try:
            return self.processor.image.one(load_image(rec.image))
        except ValueError as e:
            raise DataError(self.path, [(rec.line, str(e))]) from None


def load_conversations(path, processor, image_root=None, skip_bad: bool = False,
                       max_length: int | None = None) -> ConversationData:
    """Read, validate and encode a JSONL file for a model's processor.

    Conversations longer than `max_length` (default: the model's context,
    `text.max_position_embeddings`) are errors. With skip_bad, bad lines are dropped and
    listed in `.problems`; otherwise any bad line raises DataError naming every bad line.
    """
    records, problems = read_jsonl(path, image_root)
    max_length = max_length or processor.cfg.text.max_position_embeddings
    good, encoded = [], []
    for rec in records:
        enc = encode(rec, processor)
        if len(enc.input_ids) > max_length:
            problems.append((rec.line, f"conversation is {len(enc.input_ids)} tokens, longer "
                                       f"than the context of {max_length}"))
            continue
        good.append(rec)
        encoded.append(enc)
    problems.sort()
    if problems and not skip_bad:
        raise DataError(path, problems, "\n(fix these lines, or pass --skip-bad-data to leave "
                                        "them out)")
    if not good:
        raise DataError(path, problems or [(0, "no records")], "\n(no usable records)")
    return ConversationData(Path(path), good, encoded, processor, problems)


def collate(items: list[Encoded], pad_id: int, pixels: list[torch.Tensor | None]):
    """Left-padded batch: input_ids, attention_mask (bool), labels (B, T); pixels (I, 3, S, S)."""
    ids, mask = left_pad([torch.tensor(e.input_ids, dtype=torch.long) for e in items], pad_id)
    labels, _ = left_pad([torch.tensor(e.labels, dtype=torch.long) for e in items], IGNORE)
    px = [p for p in pixels if p is not None]
    return ids, mask, labels, (torch.stack(px) if px else None)


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, drop a trailing full stop: 'Top  Left.' -> 'top left'."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass
class EvalResult:
    correct: dict[str, int]  # per question type ("" when untyped)
    total: dict[str, int]
    mistakes: list[tuple[int, str, str, str]] = field(default_factory=list)  # line, q, got, want

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def by_type(self) -> dict[str, float]:
        return {t: self.correct[t] / self.total[t] for t in sorted(self.total) if self.total[t]}


@torch.no_grad()
def evaluate(model, data: ConversationData, skip=None, batch_size: int = 64,
             shard: tuple[int, int] = (0, 1), max_new_tokens: int | None = None) -> EvalResult:
    """Exact match of greedy answers to the first question of each record.

    The prompt is the first user turn alone; generation stops at </s>. `shard` (rank, world)
    scores every world-th record from rank on (the caller sums the counts over processes).
    """
    from ..generate import generate
    processor = data.processor
    tok = processor.tokenizer
    param = next(model.parameters())
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(tok.encode(r.turns[0][1], add_special_tokens=False).ids)
                                 for r in data.records)
    types = sorted({r.type for r in data.records})
    res = EvalResult(dict.fromkeys(types, 0), dict.fromkeys(types, 0))
    was_training = model.training
    model.eval()
    mine = list(range(shard[0], len(data), shard[1]))
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        ids, mask, _, px = collate([encode(data.records[i], processor, answers=False)
                                    for i in chunk], processor.pad_token_id,
                                   [data.pixels(i) for i in chunk])
        px = None if px is None else px.to(param.device, param.dtype)
        out = generate(model, ids.to(param.device), px, mask.to(param.device),
                       max_new_tokens=max_new_tokens, skip=skip)
        for row, i in enumerate(chunk):
            rec = data.records[i]
            got = processor.decode(out.tokens[row, :int(out.lengths[row])].cpu())
            ok = exact_match(got, rec.turns[0][1])
            res.total[rec.type] += 1
            res.correct[rec.type] += ok
            if not ok and len(res.mistakes) < 20:
                res.mistakes.append((rec.line, rec.turns[0][0], got, rec.turns[0][1]))
    model.train(was_training)
    return res
