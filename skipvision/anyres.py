"""LLaVA-NeXT's any-resolution images: the geometry the processor and the model share.

An image of height x width is scaled to fit the candidate resolution (H, W) of
`image_grid_pinpoints` that keeps most of its pixels (least padding on a tie), padded to (H, W)
and cut into (H / S) x (W / S) tiles of the tower's size S; the whole image squashed to S x S
is the base tile, first. The model lays the tiles' g x g feature grids side by side, crops the
rows or columns that only saw padding (`unpad`), and ends every row with `image_newline`:

    [base: g*g tokens][tiles, unpadded: rows x (cols + 1) tokens, the last of each row a newline]

Mirrors transformers/models/llava_next (select_best_resolution, unpad_image,
pack_image_features). Shapes: T tiles, g = S / patch, C width.
"""
from __future__ import annotations

import torch

from .errors import InputError


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (H, W) of `pinpoints` that keeps most of the image's pixels when it is scaled to
    fit, then wastes the least area."""
    best, kept_best, waste_best = None, 0, float("inf")
    for H, W in pinpoints:
        scale = min(W / width, H / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = H * W - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (H, W), kept, waste
    return best


def tile_grid(cfg, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of height x width (the base tile not counted)."""
    H, W = best_resolution(height, width, cfg.image_grid_pinpoints)
    return H // cfg.vision.image_size, W // cfg.vision.image_size


def unpad(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The feature rows and columns [top, bottom) x [left, right) of a rows x cols grid that
    saw the image rather than its padding (LLaVA-NeXT's rounding, to 7 decimals)."""
    if width / height > cols / rows:  # wider than the grid: padding above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 0, rows, pad, cols - pad


def image_tokens(cfg, height: int, width: int) -> int:
    """Tokens one image of height x width becomes: base, unpadded tiles, one newline a row."""
    g = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = tile_grid(cfg, height, width)
    top, bottom, left, right = unpad(rows * g, cols * g, height, width)
    return cfg.image_seq_length + (bottom - top) * (right - left + 1)


def pack(x: torch.Tensor, cfg, height: int, width: int, newline: torch.Tensor) -> torch.Tensor:
    """One image's per-tile values (1 + rows*cols, g*g, D), base tile first -> its token
    sequence (N, D), `newline` (D,) ending every row of the tiles."""
    g = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = tile_grid(cfg, height, width)
    D = x.shape[-1]
    grid = x[1:].view(rows, cols, g, g, D).permute(0, 2, 1, 3, 4)  # (rows, g, cols, g, D)
    grid = grid.reshape(rows * g, cols * g, D)
    top, bottom, left, right = unpad(rows * g, cols * g, height, width)
    grid = grid[top:bottom, left:right]
    ends = newline.to(x).expand(grid.shape[0], 1, D)
    return torch.cat([x[0], torch.cat([grid, ends], 1).flatten(0, 1)])  # (N, D)


def tiles(cfg, image_sizes: torch.Tensor) -> list[int]:  # per image, the base tile included
    return [1 + r * c for r, c in (tile_grid(cfg, h, w) for h, w in image_sizes.tolist())]


def check(cfg, pixel_values: torch.Tensor, image_sizes) -> list[int]:
    """Validate a batch's image_sizes (I, 2) against its tiles; the tokens of each image."""
    if not (isinstance(image_sizes, torch.Tensor) and image_sizes.shape ==
            (pixel_values.shape[0], 2) and bool((image_sizes > 0).all())):
        raise InputError("LLaVA-NeXT needs image_sizes, (images, 2) heights and widths")
    if max(tiles(cfg, image_sizes)) > pixel_values.shape[1]:
        raise InputError("pixel_values hold fewer tiles than image_sizes call for")
    return [image_tokens(cfg, h, w) for h, w in image_sizes.tolist()]


def pack_all(cfg, image_sizes, feats, attn, newline):
    """Tiles' features (tiles, g*g, C), CLS attention (tiles, g*g) or None -> per image: tokens
    (N_i, C), attention (N_i,; newlines last), parts (N_i,; 0 base, 1 tile, 2 newline)."""
    sizes, n = image_sizes.tolist(), tiles(cfg, image_sizes)

    def each(values, end):  # (tiles, g*g, D) -> per image (N_i, D)
        return [pack(v, cfg, h, w, end) for v, (h, w) in zip(values.split(n), sizes)]
    part = torch.ones_like(feats[..., :1])  # (tiles, g*g, 1)
    part[[sum(n[:i]) for i in range(len(n))]] = 0
    part = [p[:, 0] for p in each(part, part.new_tensor([2.0]))]
    if attn is not None:
        attn = [a[:, 0] for a in each(attn[..., None], attn.new_tensor([-torch.inf]))]
    return each(feats, newline), attn, part
