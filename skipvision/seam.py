"""The seam every token policy passes through: the plain input's rows gathered, plus rows the
policy makes, into one arranged input (Skip-Vision, skip.py; the pruners, skipvision/pruning).

A policy decides, per image, which of the plain input's rows to keep and which rows to make
(merged or summary tokens); `assemble` lays them out where the image's tokens were, text in
place, rows left-padded, positions contiguous over the arranged sequence, and records where
every token came from (`Layout`). Shapes: B batch, T tokens, I images, C LLM width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import InputError
from .kv_cache import left_pad, slots

PAD, TEXT, RETAINED, SUMMARY, SKIPPED = -1, 0, 1, 2, 3  # Layout.kind values


@dataclass
class Layout:
    """Where every token of the arranged (B, T) sequence came from, and where images went."""
    kind: torch.Tensor  # (B, T) PAD / TEXT / RETAINED / SUMMARY / SKIPPED
    index: torch.Tensor  # (B, T) the plain input's flat (B*T0) row a token copies; -1 if made here
    image: torch.Tensor  # (B, T) image of image-derived tokens, else -1
    dest: list  # per image (N_i,): the column each of its tokens went to (-1: dropped)

    @property
    def is_skipped(self) -> torch.Tensor:
        return self.kind == SKIPPED


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """(I, K) indices (as many distinct ones per row) -> (I, n - distinct) the others, ascending."""
    taken = torch.zeros(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    return (~taken.scatter(1, keep, True)).nonzero()[:, 1].view(keep.shape[0], -1)


def assemble(plain, images, made, segments, kinds, position_ids=None):
    """The arranged LMInput: per batch row its text in place and, in place of each image's
    tokens, `segments[i]` (rows of the table [plain rows (B*T), made rows (E, C)]) of kinds
    `kinds[i]`; positions run over the arranged sequence. Also the arranged column of every
    table row (-1: not used). Any token policy that gathers and makes rows ends here."""
    if position_ids is not None:
        raise InputError("position_ids cannot be combined with a token policy (Skip-Vision, "
                         "pruning): positions are recomputed over the arranged sequence")
    B, T, C = plain.embeds.shape
    flat = plain.embeds.flatten(0, 1)  # (B*T, C)
    index, kind, image = _rows(plain.attention_mask, images, segments, kinds)
    pad_row = B * T + len(made)
    index, valid = left_pad(index, pad_row)
    kind, image = left_pad(kind, PAD)[0], left_pad(image, -1)[0]
    table = torch.cat([flat, made, flat.new_zeros(1, C)])  # (pad_row + 1, C)
    embeds = table.index_select(0, index.flatten()).view(*index.shape, C)  # (B, T', C)
    pos, horizon = slots(valid)
    col = torch.full((pad_row + 1,), -1, device=pos.device)
    col[index[valid]] = valid.nonzero()[:, 1]
    layout = Layout(kind, index.masked_fill(index >= B * T, -1), image, [])
    return dataclasses.replace(plain, embeds=embeds, pos=pos, horizon=horizon,
                               attention_mask=valid, layout=layout), col


def _rows(mask, images, segments, kinds):
    """Per batch row: the table rows, kinds and image numbers of the arranged sequence."""
    B, T = mask.shape
    start = (~mask).sum(1).tolist()  # first real column of each row (left padding)
    out = [([], [], []) for _ in range(B)]

    def add(b, end, image=None):  # the row's text up to column `end`, then an image
        text = b * T + torch.arange(start[b], end, device=mask.device)
        pieces = [(text, torch.full_like(text, TEXT), torch.full_like(text, -1))]
        if image is not None:
            pieces.append((segments[image], kinds[image], torch.full_like(kinds[image], image)))
        for piece in pieces:
            for part, x in zip(out[b], piece):
                part.append(x)

    for i, (b, cols) in enumerate(zip(images.row.tolist(), images.cols)):
        add(b, int(cols[0]), i)
        start[b] = int(cols[-1]) + 1
    for b in range(B):
        add(b, T)
    return ([torch.cat(r[j]) for r in out] for j in range(3))
