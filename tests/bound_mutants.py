"""Mutation test of the error-bound checks: each mutant is one deliberate mistake in a copy of
skipvision/analysis/bound_lemmas.py or bound.py (a constant shrunk or grown, a term dropped, a
norm swapped); the property tests alone (no comparison with reference/bound.py, which holds the
same formulas) must fail on every one.

    python tests/bound_mutants.py            # all mutants, 2 at a time; prints the kill table
    python tests/bound_mutants.py 3 7        # some of them

A mutant that makes the bound smaller must be caught as a violation (measured > bound), one
that makes it larger as a loss of tightness (tests/test_bound_attained.py: each term attained).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEMMAS, BOUND = "skipvision/analysis/bound_lemmas.py", "skipvision/analysis/bound.py"
TESTS = [t for t in ["tests/test_bound_attained.py", "tests/test_bound_corollary1.py",
                     "tests/test_bound_lemmas.py", "tests/test_bound_theorems.py"]
         if (ROOT / t).exists()]
SELECT = "not reference_oracle and not smollm2"  # the oracle comparison and the real weights

MUTANTS = [  # (file, original, mutated, what)
    (LEMMAS, '"silu": 1.1,', '"silu": 1.0,', "SiLU's derivative bound 1.1 -> 1.0"),
    (LEMMAS, '"silu": 1.1,', '"silu": 1.3,', "SiLU's derivative bound 1.1 -> 1.3 (loose)"),
    (LEMMAS, "return torch.minimum(2 * rc * delta / (sx + lo), rc * xn / sx + rc)",
     "return torch.minimum(rc * delta / (sx + lo), rc * xn / sx + rc)", "Lemma 1: 2 sqrt(C) -> sqrt(C)"),
    (LEMMAS, "return torch.minimum(2 * rc * delta / (sx + lo), rc * xn / sx + rc)",
     "return torch.minimum(2 * rc * delta / (sx + sx), rc * xn / sx + rc)", "Lemma 1: no ball"),
    (LEMMAS, "return torch.minimum(2 * rc * delta / (sx + lo), rc * xn / sx + rc)",
     "return torch.minimum(2 * rc * delta / (sx + lo), rc * xn / sx)", "Lemma 1: cap without sqrt(C)"),
    (LEMMAS, "return (spread / 2).clamp(max=2)", "return (spread / 4).clamp(max=2)",
     "Lemma 3a: half-spread -> quarter"),
    (LEMMAS, "return (spread / 2).clamp(max=2)", "return (spread / 2).clamp(max=1)",
     "Lemma 3a: cap 2 -> 1"),
    (LEMMAS, "hi = (log_a + b - torch.logsumexp(log_a - b, -1, keepdim=True))",
     "hi = (log_a + b / 2 - torch.logsumexp(log_a - b, -1, keepdim=True))", "Lemma 3b: e^b -> e^(b/2)"),
    (LEMMAS, "lo = (log_a - b - torch.logsumexp(log_a + b, -1, keepdim=True)).exp()",
     "lo = (log_a - torch.logsumexp(log_a + b, -1, keepdim=True)).exp()", "Lemma 3b: lower end without e^-b"),
    (LEMMAS, "b = (dq[..., None] * s.k_dist + q_tilde[..., None] * dk)",
     "b = (q_tilde[..., None] * dk)", "Lemma 5: query change term dropped"),
    (LEMMAS, "b = (dq[..., None] * s.k_dist + q_tilde[..., None] * dk)",
     "b = (dq[..., None] * s.k_dist)", "Lemma 5: key change term dropped"),
    (LEMMAS, "q_tilde = torch.minimum(s.q_norm + dq,", "q_tilde = torch.minimum(s.q_norm,",
     "Lemma 5: perturbed query norm without its change"),
    (LEMMAS, "value = torch.minimum(torch.minimum(dv_max, (s.attn * dv).sum(-1) + tau / 2 * dv_max),",
     "value = torch.minimum(torch.minimum(dv_max, (s.attn * dv).sum(-1)),",
     "Lemma 5: value path without tau/2 max dv"),
    (LEMMAS, "(hi * dv).sum(-1))", "(s.attn * dv).sum(-1))", "Lemma 5: hi weights -> full-run weights"),
    (LEMMAS, "return torch.minimum(soft + value, reach_o + dv_max)",
     "return torch.minimum(soft + value, reach_o)", "Lemma 5: fallback without max dv"),
    (LEMMAS, "return torch.minimum(soft + value, reach_o + dv_max)",
     "return torch.minimum(soft / 2 + value, reach_o + dv_max)", "Lemma 5: softmax path halved"),
    (LEMMAS, "return s.evict + torch.minimum(w.o * beta.pow(2).sum(1).sqrt(), beta_out.sum(1))",
     "return torch.minimum(w.o * beta.pow(2).sum(1).sqrt(), beta_out.sum(1))",
     "Lemma 5: eviction term dropped"),
    (LEMMAS, "return s.evict + torch.minimum(w.o * beta.pow(2).sum(1).sqrt(), beta_out.sum(1))",
     "return s.evict + torch.minimum(w.o * beta.amax(1), beta_out.sum(1))",
     "Lemma 5: heads by max instead of root-sum-square"),
    (LEMMAS, "return dict(gate=c * nu * torch.minimum(w.gate * s.u_inf, w.gate_row * s.u_two),",
     "return dict(gate=nu * torch.minimum(w.gate * s.u_inf, w.gate_row * s.u_two),",
     "Lemma 2: gate path without c_sigma"),
    (LEMMAS, "up=nu * torch.minimum(w.up * s.a_inf, w.up_row * s.a_two),",
     "up=0 * nu,", "Lemma 2: up path dropped"),
    (LEMMAS, "second=c * nu**2 * min(w.gate_row * w.up, w.gate * w.up_row),",
     "second=0 * nu,", "Lemma 2: second-order term dropped"),
    (LEMMAS, "cap=s.core + w.down * torch.minimum(g_inf * u_two, g_two * u_inf))",
     "cap=w.down * torch.minimum(g_inf * u_two, g_two * u_inf))", "Lemma 2: cap without the full run's output"),
    (LEMMAS, "gate_row=wg.norm(dim=1).max().item()", "gate_row=wg.norm(dim=1).mean().item()",
     "gate row norms: max -> mean"),
    (LEMMAS, "out = out + torch.where(skip_ref != skip_new, s.ffn.dropped, 0)",
     "out = out + torch.where(skip_ref & ~skip_new, s.ffn.dropped, 0)",
     "Lemma 6: the dropped FFN output only where the full run skips"),
    (LEMMAS, "return w.gain * mu, w.head * mu, w.head_row * mu",
     "return w.gain * mu, w.head * mu, w.head_row * mu / 2", "Lemma 7: l-inf head bound halved"),
    (LEMMAS, "return w.gain * mu, w.head * mu, w.head_row * mu",
     "return w.gain * mu, w.head * mu, w.head * mu", "Lemma 7: l-inf uses the spectral norm (loose)"),
    (LEMMAS, "return w.gain * mu, w.head * mu, w.head_row * mu",
     "return w.gain * mu, w.head_row * mu, w.head_row * mu", "Lemma 7: l2 uses the largest row"),
    (LEMMAS, "return w.gain * mu, w.head * mu, w.head_row * mu",
     "return mu, w.head * mu, w.head_row * mu", "Lemma 7: hidden states without the gain"),
    (LEMMAS, "l_ffn = w.down * (ACT_LIPSCHITZ[w.act] * w.gate * u_inf + a_inf * w.up) / math.sqrt(w.eps)",
     "l_ffn = w.down * (ACT_LIPSCHITZ[w.act] * w.gate * u_inf + a_inf * w.up) / math.sqrt(w.eps) / 2",
     "Corollary 1: L_F halved"),
    (LEMMAS, "per_head = (w.q * k_max + q_max * wk) / math.sqrt(w.head_dim) * v_max + wv",
     "per_head = (w.q * k_max + q_max * wk) / math.sqrt(w.head_dim) * v_max",
     "Corollary 1: L_A without the value path"),
    (LEMMAS, "per_head = (w.q * k_max + q_max * wk) / math.sqrt(w.head_dim) * v_max + wv",
     "per_head = (q_max * wk) / math.sqrt(w.head_dim) * v_max + wv",
     "Corollary 1: L_A without the query term"),
    (LEMMAS, "l_attn = w.o * per_head.pow(2).sum().sqrt().item() / math.sqrt(w.eps)",
     "l_attn = w.o * per_head.pow(2).sum().sqrt().item() / math.sqrt(w.eps) / 2",
     "Corollary 1: L_A halved"),
    (BOUND, "apri.append((1 + l_ffn) * ((1 + l_attn) * apri[-1] + evict) + eps_l)",
     "apri.append((1 + l_ffn) * ((1 + l_attn) * apri[-1] + evict))",
     "Corollary 1: the dropped FFN output not added"),
    (BOUND, "apri.append((1 + l_ffn) * ((1 + l_attn) * apri[-1] + evict) + eps_l)",
     "apri.append((1 + l_ffn) * ((1 + l_attn) * apri[-1]) + eps_l)",
     "Corollary 1: the eviction term not added"),
]


def copy_repo(dst: Path) -> None:
    for part in ("skipvision", "tests", "reference", "checkpoints", "examples"):
        shutil.copytree(ROOT / part, dst / part,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def run_one(i: int | None, examples: int = int(os.environ.get("MUTANT_EXAMPLES", "100"))) -> dict:
    """Apply mutant i (None: none) to a fresh copy and run the property tests there: killed if
    they fail."""
    file, old, new, what = MUTANTS[i] if i is not None else (LEMMAS, "", "", "no mutation")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy_repo(tmp)
        path = tmp / file
        text = path.read_text()
        if i is not None and text.count(old) != 1:
            raise ValueError(f"mutant {i} ({what}): the original text occurs {text.count(old)} "
                             f"times in {file}")
        path.write_text(text.replace(old, new) if i is not None else text)
        env = {**os.environ, "PYTHONPATH": str(tmp), "BOUND_EXAMPLES": str(examples)}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-x", "-q",
                               "-p", "no:cacheprovider", "-p", "no:warnings",
                               "-m", "bound or not bound", "-k", SELECT,
                               "--hypothesis-profile=ci"],
                              cwd=tmp, env=env, capture_output=True, text=True)
        failed = [x.split(" ")[1] for x in done.stdout.splitlines() if x.startswith("FAILED")]
        return dict(mutant=i, what=what, killed=done.returncode == 1,
                    by=failed[0].split("::")[-1] if failed else None,
                    seconds=round(time.perf_counter() - t0, 1), returncode=done.returncode)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    which = [int(a) for a in argv] or list(range(len(MUTANTS)))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_one, [None] + which))
    base = results.pop(0)
    if base["killed"] or base["returncode"] != 0:
        raise SystemExit(f"the tests fail without any mutation (exit {base['returncode']}): "
                         "fix them first")
    for r in results:
        print(f"{r['mutant']:>3} {'killed' if r['killed'] else 'SURVIVED':>8} {r['seconds']:6.1f}s"
              f"  {r['what']}  [{r['by']}]", flush=True)
    killed = sum(r["killed"] for r in results)
    print(f"{killed}/{len(results)} mutants killed by the property tests alone")
    return results


if __name__ == "__main__":
    main()
