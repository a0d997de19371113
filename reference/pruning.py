"""Slow oracles of the training-free pruners (skipvision/pruning), written from their papers.

Python loops over tokens and pairs, one batch row at a time, explicit softmax attention with
full maps, no KV cache. Pruning inside the LLM is a mask here: from layer K on, no query sees
a dropped token (whose own row is computed and ignored); the fast path removes those rows.
Generation re-runs the whole sequence each step; what was dropped is decided on the prompt.
"""
from __future__ import annotations

import math
import zlib

import torch

from .dense import TEXT, _lin, decoder_layer, image_tokens, rmsnorm, top
from .rope import inv_freq


def cos_sim(a, b) -> float:
    """Exactly rounded sums (math.fsum): cos_sim(a, b) == cos_sim(b, a) bit for bit."""
    a, b = a.double().tolist(), b.double().tolist()
    norm = math.sqrt(math.fsum(t * t for t in a)) * math.sqrt(math.fsum(t * t for t in b))
    return math.fsum(s * t for s, t in zip(a, b)) / max(norm, 1e-300)


def random_keep(x, p):
    """The seeded draw: the first `budget` of a permutation, seeded by the seed and the
    image's first token rounded to bfloat16."""
    key = zlib.crc32(x[0].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    g = torch.Generator().manual_seed(p.seed * 1_000_003 + key)
    return sorted(torch.randperm(len(x), generator=g)[:p.budget].tolist())


def divprune_keep(x, budget):
    """Greedy max-min diversity (DivPrune, Alg. 1): distances 1 - cosine."""
    N = len(x)
    d = [[math.inf if i == j else 1 - cos_sim(x[i], x[j]) for j in range(N)] for i in range(N)]
    first = max(range(N), key=lambda i: (min(d[i]), -i))
    chosen = [first]
    while len(chosen) < budget:
        j = max((j for j in range(N) if j not in chosen),
                key=lambda j: (min(d[s][j] for s in chosen), -j))
        chosen.append(j)
    return sorted(chosen)


def visionzip_tokens(x, attn, budget, n_ctx):
    """(kept indices, contextual tokens): dominant by CLS attention, the rest merged onto
    evenly spaced targets by cosine similarity (VisionZip, Sec. 3)."""
    dominant = top(attn.tolist(), budget - n_ctx)
    rest = [j for j in range(len(x)) if j not in dominant]
    if n_ctx == 0:
        return dominant, []
    step = max(1, len(rest) // n_ctx)
    targets = [rest[t] for t in range(0, len(rest), step)][:n_ctx]
    groups = {t: [t] for t in targets}
    for j in rest:
        if j not in groups:
            best = max(range(len(targets)), key=lambda i: (cos_sim(x[j], x[targets[i]]), -i))
            groups[targets[best]].append(j)
    return dominant, [torch.stack([x[i] for i in groups[t]]).mean(0) for t in targets]


def rows(model, ids, px, mask, p, sizes=None):
    """Per batch row: the LLM's input as (embedding, image or -1, token of the image or -1)
    triples; seam pruners already applied (in-LM ones see every token here)."""
    cfg, E = model.cfg, model.language_model.model.embed_tokens.weight
    images = image_tokens(model, px, sizes) if px is not None else []
    out, g = [], 0
    for b in range(ids.shape[0]):
        row, cols = [], [c for c in range(ids.shape[1]) if mask[b, c]]
        t = 0
        while t < len(cols):
            if int(ids[b, cols[t]]) != cfg.image_token_id:
                row.append((E[int(ids[b, cols[t]])], -1, -1))
                t += 1
                continue
            tokens = images[g]
            x = torch.stack([f for f, _, _ in tokens])
            if p is None or p.method in ("fastv", "dart"):
                row += [(x[j], g, j) for j in range(len(x))]
            elif p.method == "visionzip":
                keep, ctx = visionzip_tokens(x, torch.tensor([s for _, s, _ in tokens]),
                                             p.budget, p.n_contextual)
                row += [(x[j], g, j) for j in keep] + [(c, g, -1) for c in ctx]
            else:
                keep = random_keep(x, p) if p.method == "random" else divprune_keep(x, p.budget)
                row += [(x[j], g, j) for j in keep]
            t, g = t + len(tokens), g + 1
        out.append(row)
    return out


def hidden(model, row, p, dropped=None):
    """Final hidden states (T, C) of one row, and the set of dropped positions (in-LM
    pruners: decided here when `dropped` is None, i.e. on the prompt)."""
    cfg, lm = model.cfg.text, model.language_model.model
    x = torch.stack([e for e, _, _ in row])
    T = len(row)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq(cfg.rope, cfg.head_dim)
    cos, sin = (f(torch.cat([ang, ang], -1)).to(x.dtype) for f in (torch.cos, torch.sin))
    D = cfg.head_dim
    rot = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    K = p.layer if p is not None and p.method in ("fastv", "dart") else None
    last_maps = None
    for li, layer in enumerate(lm.layers):
        if li == K and dropped is None:
            dropped = _choose(model, row, p, x, last_maps)
        allowed = causal.clone()
        if K is not None and li >= K:
            allowed[:, sorted(dropped)] = False
            allowed |= torch.eye(T, dtype=torch.bool)  # a dropped row: anything finite
        x, last_maps = decoder_layer(layer, x, allowed, cfg, rot)
    return rmsnorm(lm.norm, x), dropped or set()


def _choose(model, row, p, x, maps):
    """Positions of the image tokens dropped at layer K (FastV: layer K - 1's last-query
    attention, heads averaged; DART: pivots by key norm, then least duplicated)."""
    by_image = {}
    for t, (_, g, _) in enumerate(row):
        if g >= 0:
            by_image.setdefault(g, []).append(t)
    layer, dropped = model.language_model.model.layers[p.layer], set()
    for g, pos in by_image.items():
        if p.method == "fastv":
            score = maps[:, -1, :].mean(0)
            keep = [pos[j] for j in top([float(score[t]) for t in pos], p.budget)]
        else:
            kn = [float(_lin(layer.self_attn.k_proj, rmsnorm(layer.input_layernorm, x[t])).norm())
                  for t in pos]
            pivots = [pos[j] for j in top(kn, p.n_pivots)]
            dup = {t: max(cos_sim(x[t], x[s]) for s in pivots) for t in pos if t not in pivots}
            rest = sorted(dup, key=lambda t: (dup[t], t))[:p.budget - len(pivots)]
            keep = pivots + rest
        dropped |= set(pos) - set(keep)
    return dropped


def last(h, dropped):
    """The last row the LLM still has (a prompt may end with a dropped image token)."""
    return h[max(t for t in range(len(h)) if t not in dropped)]


def logits(model, ids, px, mask, p, sizes=None):
    """Per row: logits of the last token of the prompt (V,)."""
    W = model.language_model.lm_head.weight
    return [last(*hidden(model, r, p)) @ W.T for r in rows(model, ids, px, mask, p, sizes)]


def naive_generate(model, ids, px, mask, n_new, p, sizes=None):
    """Greedy, no cache: (B, n_new); the dropped set is the prompt's."""
    E, W = model.language_model.model.embed_tokens.weight, model.language_model.lm_head.weight
    out = []
    for row in rows(model, ids, px, mask, p, sizes):
        dropped, toks = None, []
        for _ in range(n_new):
            h, dropped = hidden(model, row, p, dropped)
            toks.append(int((last(h, dropped) @ W.T).argmax()))
            row = row + [(E[toks[-1]], -1, -1)]
        out.append(toks)
    return torch.tensor(out)


__all__ = ["TEXT", "rows", "hidden", "logits", "naive_generate", "divprune_keep",
           "visionzip_tokens", "random_keep"]
