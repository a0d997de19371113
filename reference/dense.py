"""A dense, slow oracle of LLaVA and of the whole Skip-Vision method.

Written the obvious way, independently of skipvision's fast paths: Python loops over tokens and
images, explicit softmax attention with full (T, S) maps for every layer, masks instead of
gathers (Skip-FFN computes the FFN everywhere and zeroes it on skipped rows), no KV cache
(generation re-runs the whole sequence; Skip-KV is a mask hiding the skipped keys from every
token after the prompt). Only the weights are read from the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rope import inv_freq

PAD, TEXT, RETAINED, SUMMARY, SKIPPED = -1, 0, 1, 2, 3


def _lin(mod, x):
    return x @ mod.weight.T + (0 if mod.bias is None else mod.bias)


def _act(name, x):
    return {"quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
            "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
            "silu": lambda t: t * torch.sigmoid(t)}[name](x)


def vision_states_and_maps(model, px):
    """All CLIP hidden states and every layer's full attention map (I, H, P, P)."""
    vm, cfg = model.vision_tower.vision_model, model.cfg.vision
    e = vm.embeddings
    patches = F.conv2d(px, e.patch_embedding.weight, stride=cfg.patch_size)  # (I, C, g, g)
    x = torch.cat([e.class_embedding.expand(px.shape[0], 1, -1),
                   patches.flatten(2).transpose(1, 2)], 1) + e.position_embedding.weight
    ln = lambda m, t: F.layer_norm(t, t.shape[-1:], m.weight, m.bias, m.eps)
    x = ln(vm.pre_layrnorm, x)
    states, maps = [x], []
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    for layer in vm.encoder.layers:
        a = layer.self_attn
        h = ln(layer.layer_norm1, x)
        q, k, v = (_lin(m, h).unflatten(-1, (H, D)).transpose(1, 2)
                   for m in (a.q_proj, a.k_proj, a.v_proj))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
        maps.append(p)
        x = x + _lin(a.out_proj, (p @ v).transpose(1, 2).flatten(2))
        h = ln(layer.layer_norm2, x)
        x = x + _lin(layer.mlp.fc2, _act(cfg.hidden_act, _lin(layer.mlp.fc1, h)))
        states.append(x)
    return states, maps


def image_features(model, px):
    cfg = model.cfg
    states, maps = vision_states_and_maps(model, px)
    hs = [states[i] for i in cfg.feature_layers]
    if cfg.vision_feature_select_strategy == "default":
        hs = [h[:, 1:] for h in hs]
    p = model.multi_modal_projector
    x = torch.cat(hs, -1)
    return _lin(p.linear_2, _act(cfg.projector_hidden_act, _lin(p.linear_1, x))), maps


def cls_scores(maps, cfg):
    """(I, N): the CLS query's attention on each feature's position, heads summed."""
    row = maps[cfg.feature_layers[-1] - 1][:, :, 0, :].sum(1)  # (I, P)
    return row[:, 1:] if cfg.vision_feature_select_strategy == "default" else row


def select(maps, cfg, n_r):
    """Per image: indices of the N_r highest CLS-attention feature tokens, raster order."""
    return [top(s, n_r) for s in cls_scores(maps, cfg).tolist()]


def top(scores, n):
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:n])


def best_fit(h, w, pinpoints):
    """LLaVA-NeXT: the candidate that keeps most pixels of the scaled image, then least waste."""
    def key(hw):
        s = min(hw[1] / w, hw[0] / h)
        kept = min(int(w * s) * int(h * s), w * h)
        return (-kept, hw[0] * hw[1] - kept)
    return min(pinpoints, key=key)  # the first of equals, as a scan keeping the first best


def next_tokens(model, tiles, h, w):
    """One LLaVA-NeXT image, token by token: (feature, CLS score, part) with part 0 for the
    base tile, 1 for a tile, 2 for a row's newline; the grid of tile features cropped to the
    rows or columns the fitted image covers. Skip-Vision drops the newlines."""
    cfg = model.cfg
    g = cfg.vision.image_size // cfg.vision.patch_size
    H, W = best_fit(h, w, cfg.image_grid_pinpoints)
    rows, cols = H // cfg.vision.image_size, W // cfg.vision.image_size
    feats, maps = image_features(model, tiles[:1 + rows * cols])
    scores = cls_scores(maps, cfg) if cfg.feature_layers[-1] > 0 else torch.zeros(feats.shape[:2])
    out = [(feats[0, j], float(scores[0, j]), 0) for j in range(g * g)]
    R, K = rows * g, cols * g  # the grid, in features
    if w / h > K / R:
        pad = (R - int(round(h * (K / w), 7))) // 2
        ys, xs = range(pad, R - pad), range(K)
    else:
        pad = (K - int(round(w * (R / h), 7))) // 2
        ys, xs = range(R), range(pad, K - pad)
    for y in ys:
        for x in xs:
            t, j = 1 + (y // g) * cols + x // g, (y % g) * g + x % g
            out.append((feats[t, j], float(scores[t, j]), 1))
        out.append((model.image_newline, -math.inf, 2))
    return out


def image_tokens(model, px, sizes=None):
    """Per image, its tokens as (feature, CLS score, part)."""
    if model.cfg.image_grid_pinpoints:
        return [next_tokens(model, px[i], h, w) for i, (h, w) in enumerate(sizes.tolist())]
    feats, maps = image_features(model, px)
    scores = cls_scores(maps, model.cfg) if model.cfg.feature_layers[-1] > 0 else None
    return [[(f[j], 0.0 if scores is None else float(scores[i, j]), 0) for j in range(len(f))]
            for i, f in enumerate(feats)]


def merge(x, n_out, order):
    """One image's candidates (M, C) -> merged (n_out, C), with Python loops."""
    M = x.shape[0]
    if n_out == 0:
        return x[:0], []
    unit = [x[i].detach() / max(x[i].norm().item(), 1e-12) for i in range(M)]  # ranking only
    sim = [[0.0 if i == j else float(unit[i] @ unit[j]) for j in range(M)] for i in range(M)]
    red = [sum(r) for r in sim]
    rank = sorted(range(M), key=lambda i: (-red[i], i))
    src, dst = rank[:M - n_out], rank[M - n_out:]
    if order == "spatial":
        dst = sorted(dst)
    groups = {d: [d] for d in dst}
    for s in src:
        best = max(range(len(dst)), key=lambda j: (sim[s][dst[j]], -j))
        groups[dst[best]].append(s)
    return torch.stack([torch.stack([x[i] for i in groups[d]]).mean(0) for d in dst]), dst


def pool(x, scorer):
    if scorer is None:
        return x.mean(0)
    h = F.layer_norm(x, x.shape[-1:], scorer.norm.weight, scorer.norm.bias, scorer.norm.eps)
    w = torch.softmax(_lin(scorer.score, h)[:, 0], 0)
    return sum(w[i] * x[i] for i in range(x.shape[0]))


def arrange(model, ids, px, mask, skip, sizes=None):
    """Plain or Skip-Vision sequence: list per row of (embedding, kind, image) triples."""
    cfg = model.cfg
    E = model.language_model.model.embed_tokens.weight
    images = image_tokens(model, px, sizes) if px is not None else []
    rows, g = [], 0
    for b in range(ids.shape[0]):
        row, t = [], 0
        cols = [c for c in range(ids.shape[1]) if mask[b, c]]
        while t < len(cols):
            c = cols[t]
            if int(ids[b, c]) != cfg.image_token_id:
                row.append((E[int(ids[b, c])], TEXT, -1))
                t += 1
                continue
            tokens = images[g]
            f = torch.stack([x for x, _, _ in tokens])
            if skip is None:
                row += [(f[j], TEXT, g) for j in range(len(f))]
            else:
                if skip.retain == "thumbnail":
                    keep = [j for j, (_, _, part) in enumerate(tokens) if part == 0]
                else:
                    keep = top([s for _, s, _ in tokens], skip.retained)
                rest = [j for j in range(len(f)) if j not in keep and tokens[j][2] != 2]
                ret = f[keep]
                mrg, _ = merge(f[rest], min(skip.skipped, len(rest)), skip.merge_order)
                scorer = model.summary_scorer
                row += [(ret[j], RETAINED, g) for j in range(len(ret))]
                row += [(pool(ret, scorer), SUMMARY, g)] if skip.summary else []
                row += [(mrg[j], SKIPPED, g) for j in range(len(mrg))]
                row += [(pool(mrg, scorer), SUMMARY, g)] if skip.summary else []
            t, g = t + len(tokens), g + 1
        rows.append(row)
    return rows


def rmsnorm(m, x):
    return m.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.eps))


def decoder_layer(layer, x, allowed, cfg, rot, no_ffn=None):
    """One decoder layer on one row x (T, C): allowed (T, T) bool, `rot` RoPE at the row's
    positions, `no_ffn` (T, 1) rows whose FFN output is zeroed. Returns x and the maps."""
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = layer.self_attn
    h = rmsnorm(layer.input_layernorm, x)
    q = rot(_lin(a.q_proj, h).unflatten(-1, (H, D)).transpose(0, 1))  # (H, T, D)
    k = rot(_lin(a.k_proj, h).unflatten(-1, (Hkv, D)).transpose(0, 1))
    v = _lin(a.v_proj, h).unflatten(-1, (Hkv, D)).transpose(0, 1)
    k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    maps = torch.softmax(s, -1)  # (H, T, T)
    x = x + _lin(a.o_proj, (maps @ v).transpose(0, 1).flatten(1))
    m = layer.mlp
    ffn = _lin(m.down_proj, _act(cfg.hidden_act, _lin(m.gate_proj, rmsnorm(
        layer.post_attention_layernorm, x))) * _lin(m.up_proj, rmsnorm(
            layer.post_attention_layernorm, x)))
    return x + (ffn if no_ffn is None else ffn.masked_fill(no_ffn, 0)), maps


def llm_hidden(model, rows, skip, decode_from=None):
    """Final hidden states of each row, one row at a time, full attention maps.

    `decode_from[b]`: index of the first generated token of row b; with Skip-KV eviction those
    tokens (and later ones) cannot see the skipped tokens.
    """
    cfg = model.cfg.text
    lm = model.language_model.model
    inv = inv_freq(cfg.rope, cfg.head_dim)
    D = cfg.head_dim
    out = []
    for b, row in enumerate(rows):
        if not row:
            out.append(lm.embed_tokens.weight[:0])
            continue
        x = torch.stack([e for e, _, _ in row])
        kind = [k for _, k, _ in row]
        img = [i for _, _, i in row]
        T = len(row)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
        rot = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin
        allowed = torch.zeros(T, T, dtype=torch.bool)
        last = {i: max(j for j in range(T) if img[j] == i) for i in set(img) if i >= 0}
        for q in range(T):
            for k in range(q + 1):
                hidden = kind[k] == SKIPPED and (
                    (skip.mask == "consistent" and q > last[img[k]]) or
                    (skip.kv == "evict" and decode_from is not None and q >= decode_from[b]))
                allowed[q, k] = not hidden
        skip_rows = torch.tensor([k == SKIPPED for k in kind])[:, None]
        layers = set(range(cfg.num_hidden_layers) if skip is None or skip.layers is None
                     else skip.layers)
        for li, layer in enumerate(lm.layers):
            x = decoder_layer(layer, x, allowed, cfg, rot,
                              skip_rows if skip is not None and li in layers else None)[0]
        out.append(rmsnorm(lm.norm, x))
    return out, [[k for _, k, _ in row] for row in rows]


def logits(model, ids, px, mask, skip=None, sizes=None):
    """Per row: logits (T_b, V) of the valid tokens of the (arranged) sequence, and kinds."""
    rows = arrange(model, ids, px, mask, skip, sizes)
    hidden, kinds = llm_hidden(model, rows, skip)
    return [h @ model.language_model.lm_head.weight.T for h in hidden], kinds


def naive_generate(model, ids, px, mask, n_new, skip=None, sizes=None):
    """Greedy, no cache: the whole sequence is re-run for every new token. Returns (B, n_new)."""
    rows = arrange(model, ids, px, mask, skip, sizes)
    E = model.language_model.model.embed_tokens.weight
    start = [len(r) for r in rows]
    out = [[] for _ in rows]
    for _ in range(n_new):
        hidden, _ = llm_hidden(model, rows, skip, decode_from=start)
        for b, h in enumerate(hidden):
            tok = int((h[-1] @ model.language_model.lm_head.weight.T).argmax())
            out[b].append(tok)
            rows[b] = rows[b] + [(E[tok], TEXT, -1)]
    return torch.tensor(out)
