"""Original LLaVA-1.5's pad-to-square rule (`expand2square`), one pixel at a time.

A square of side max(w, h) filled with the background colour, the image pasted so that it
is centred: offset (side - w) // 2 across and (side - h) // 2 down (one of them is 0).
"""


def expand_to_square(pixels, color):
    """pixels: rows of (r, g, b) tuples, h rows of w; returns rows of the padded square."""
    h, w = len(pixels), len(pixels[0])
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = [[tuple(color) for _ in range(side)] for _ in range(side)]
    for y in range(h):
        for x in range(w):
            out[top + y][left + x] = tuple(pixels[y][x])
    return out
