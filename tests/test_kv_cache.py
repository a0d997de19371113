"""KVCache on its own: growth, positions, and eviction against a list-of-slots oracle."""
import torch
from hypothesis import given, settings, strategies as st

from skipvision.kv_cache import FOREVER, NEVER, KVCache

FILLER = (None, NEVER, None, None)


@settings(max_examples=50)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), steps=st.lists(st.integers(1, 4), min_size=1,
                                                                        max_size=4), data=st.data())
def test_extend_update_keep_match_slot_lists(seed, B, steps, data):
    g = torch.Generator().manual_seed(seed)
    L, Hkv, D = 2, 2, 3
    cache = KVCache(L)
    slots = [[] for _ in range(B)]  # oracle: per row, list of (pos, horizon, k per layer, v per layer)
    for T in steps:
        pos = torch.randint(0, 100, (B, T), generator=g)
        hor = torch.where(torch.rand(B, T, generator=g) < 0.2, NEVER, FOREVER)
        ks = [torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) for _ in range(L)]
        vs = [torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) for _ in range(L)]
        cache.extend(pos, hor)
        for i in range(L):
            cache.update(i, ks[i], vs[i])
        for b in range(B):
            for t in range(T):
                slots[b].append((int(pos[b, t]), int(hor[b, t]), [k[b, :, t] for k in ks],
                                 [v[b, :, t] for v in vs]))
        if data.draw(st.booleans(), label="evict now"):
            S = len(cache)
            mask = torch.rand(B, S, generator=g) < 0.6
            cache.keep(mask)
            slots = [[s for s, m in zip(row, mask[b].tolist()) if m] for b, row in enumerate(slots)]
            width = max(len(r) for r in slots)  # shorter rows get invisible filler slots
            slots = [r + [FILLER] * (width - len(r)) for r in slots]
        assert len(cache) == len(slots[0]) and all(len(r) == len(slots[0]) for r in slots)
        for b, row in enumerate(slots):
            for j, (p, h, k, v) in enumerate(row):
                assert int(cache.horizon[b, j]) == h
                if p is None:
                    continue
                assert int(cache.pos[b, j]) == p
                for i in range(L):
                    assert torch.equal(cache.k[i][b, :, j], k[i])
                    assert torch.equal(cache.v[i][b, :, j], v[i])
    assert cache.nbytes() == sum(2 * t.numel() * 8 for t in cache.k)


def test_keep_frees_memory_and_keeps_order():
    cache = KVCache(1)
    pos = torch.arange(6)[None]
    cache.extend(pos, torch.full_like(pos, FOREVER))
    k = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    cache.update(0, k, k.clone())
    before = cache.nbytes()
    cache.keep(torch.tensor([[True, False, True, False, False, True]]))
    assert cache.k[0].flatten().tolist() == [0.0, 2.0, 5.0]
    assert cache.pos.tolist() == [[0, 2, 5]]
    assert cache.nbytes() * 2 == before
    assert cache.k[0].untyped_storage().nbytes() == 3 * 8  # a new, smaller tensor, not a view
