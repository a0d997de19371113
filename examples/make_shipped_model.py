"""Reproduce the tiny LLaVA shipped in checkpoints/, and the README's training table.

    python examples/make_shipped_model.py                # everything (see README: Training)
    python examples/make_shipped_model.py --table-only   # re-time, re-score, rewrite the table

1. Data: synthetic shapes at 96x96 px (skipvision/training/synthetic.py). Stage 1 sees, per training
   image, a caption and a QA conversation (every question type), plus single-shape scenes;
   stage 2 the QA conversations; the held-out split has one question per line and no
   training image.
2. Stage 1 (no Skip-Vision): a tiny LLaVA built from scratch (vision position embeddings from
   a 2-D sin-cos table), every used part trained.
3. Stage 2 (SFT), twice from the same stage-1 weights and interleaved step by step in this one
   process, so the two step times are measured side by side: plain, and Skip-FFN (Skip-Vision
   with summary tokens, SKIP below). The vision tower is frozen, as in the paper's SFT.
4. Exact match on the held-out questions; the Skip-FFN model goes to checkpoints/tiny-llava
   (with a sample image), the plain one to checkpoints/tiny-llava-plain; the table and the
   numbers go to README.md and checkpoints/tiny-llava/training_report.json.
"""
from __future__ import annotations

import copy
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from skipvision import LlavaConfig, TextConfig, VisionConfig
from skipvision.training.data import collate, evaluate, load_conversations
from skipvision.training.fit import build_model, fit, with_summary_scorer
from skipvision.io.loading import load_pretrained, load_skip_config
from skipvision.io.saving import save_pretrained
from skipvision.skip import SkipConfig
from skipvision.training.synthetic import build_tokenizer, make_scene, render, write_dataset
from skipvision.training.train import TrainConfig, Trainer

from cli import Parser, run_main  # examples/, next to this file

ROOT = Path(__file__).resolve().parents[1]
# The paper's SV-LLaVA 100 retained / 156 skipped of 576 tokens, scaled to 144 tokens; merged
# tokens in raster order (after 400 SFT steps 89.3% held-out vs 87.5% in the authors'
# redundancy order; README, Training).
SKIP = SkipConfig(retained=25, skipped=39, summary=True, merge_order="spatial")
TYPES = 7  # question types per scene (skipvision.training.synthetic._candidates)
TABLE_BEGIN, TABLE_END = "<!-- training-table:begin -->", "<!-- training-table:end -->"


def tiny_config(vocab: int) -> LlavaConfig:
    """96 px images in 8 px patches: 144 visual tokens per image (synthetic shapes are one
    patch each), small widths so that both stages train in well under an hour on a CPU."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, image_size=96, patch_size=8),
        text=TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1,
                        eos_token_id=2, pad_token_id=3),
        image_token_id=4)  # the tokenizer's <image> (synthetic.SPECIALS)


def sincos_positions_(model) -> None:
    """Initialise the vision tower's position embeddings to a 2-D sin-cos table (rows in half the
    channels, columns in the other half; CLS at zero), as MAE-style ViTs do, so that image
    features say where their patch is from the first step on; they are trained afterwards."""
    emb = model.vision_tower.vision_model.embeddings.position_embedding.weight
    side, q = model.cfg.vision.image_size // model.cfg.vision.patch_size, emb.shape[1] // 4
    freq = 1.0 / 100.0 ** (torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angle = [4 * math.pi / side * p.reshape(-1, 1).double() * freq for p in (rows, cols)]
    table = torch.cat([torch.cat([a.sin(), a.cos()], 1) for a in angle], 1)  # (side^2, 4q)
    with torch.no_grad():
        emb.zero_()
        emb[1:, :4 * q] = table.to(emb.dtype)


def make_data(work: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """QA (every question type per training image; one question per held-out line), captions
    of the same images, and single-shape QA scenes; stage 1 sees all three, shuffled."""
    qa = write_dataset(work / "data", n_train, n_test, seed=seed, kind="qa", turns=TYPES)
    cap = write_dataset(work / "data-captions", n_train, 0, seed=seed, kind="caption")
    one = write_dataset(work / "data-single", n_train // 5, 0, seed=seed + 1, kind="qa",
                        turns=TYPES, shapes=(1, 1))
    stage1 = work / "data" / "stage1.jsonl"  # same images (same seed): a caption and a QA line
    lines = []
    for a, b in zip(qa["train"].read_text().splitlines(), cap["train"].read_text().splitlines()):
        lines += [a, json.dumps({**json.loads(b), "image": json.loads(a)["image"]})]
    for x in one["train"].read_text().splitlines():
        rec = json.loads(x)
        lines.append(json.dumps({**rec, "image": "../data-single/" + rec["image"]}))
    stage1.write_text("\n".join(lines) + "\n")
    return {"stage1": stage1, "train": qa["train"], "test": qa["test"]}


def sample(seed: int) -> tuple:
    """A held-out-style scene of 3 shapes and a question about one of them, with its answer."""
    for i in range(1000):
        rng = random.Random(f"{seed}/sample/{i}")
        scene = make_scene(rng)
        if len(scene) == 3:
            s = scene[1]
            return scene, f"what shape is the {s.colour} object ?", s.kind
    raise RuntimeError("no sample scene found")


def sample_answers(model, proc, image: Path, question: str, skip: SkipConfig) -> dict:
    """What the shipped model answers about its sample, without and with Skip-Vision (what
    `python examples/generate.py` prints; the README shows it)."""
    from skipvision import generate
    batch = proc(proc.format(question), [image])
    return {name: proc.decode(generate(model, batch["input_ids"], batch["pixel_values"],
                                       batch["attention_mask"], max_new_tokens=4,
                                       skip=s).tokens[0])
            for name, s in (("plain", None), ("skip_vision", skip))}


def training_flops(model, data, batch_size: int, skip) -> int:
    """Analytic FLOPs of one training step on the first global batch (skipvision.analysis.flops):
    LM forward + backward, plus the frozen vision side's forward (tower, projector, split,
    merge, summary scorer)."""
    from skipvision import flops
    ids, mask, _, px = collate(data.encoded[:batch_size], data.processor.pad_token_id,
                               [data.pixels(i) for i in range(batch_size)])
    with torch.no_grad():
        inp = model.prepare(ids, px, mask, skip=skip)
    g = flops.geometry_of(inp, model.cfg)
    return flops.training_step(model.cfg, g)["total"] + flops.vision(model.cfg, batch_size,
                                                                     skip)["total"]


def side_by_side(models: dict, data, cfg: TrainConfig, log_every: int = 25) -> dict:
    """Train each (model, skip) in `models` for cfg.steps, alternating step by step (and which
    goes first), recording every step's wall time."""
    trainers = {k: Trainer(m, data, cfg, s, data.processor.pad_token_id)
                for k, (m, s) in models.items()}
    times, losses, names = {k: [] for k in models}, {k: [] for k in models}, list(models)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for k in names if step % 2 == 0 else names[::-1]:
            s = trainers[k].step()
            times[k].append(s.seconds)
            losses[k].append(s.loss)
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            left = (time.perf_counter() - t0) / (step + 1) * (cfg.steps - step - 1)
            print(f"stage 2 step {step + 1}/{cfg.steps}  " + "  ".join(
                f"{k}: loss {losses[k][-1]:.4f} {statistics.median(times[k]):.3f} s/step"
                for k in names) + f"  left {left / 60:.1f} min", file=sys.stderr, flush=True)
    return {"times": times, "losses": losses}


def table(report: dict) -> str:
    p, s, sk = report["plain"], report["skip_ffn"], report["skip"]
    dt = s["step_s"] / p["step_s"] - 1
    df = s["flops"] / p["flops"] - 1
    rows = [
        "| SFT from the same stage 1 | time / step (median) | FLOPs / step (analytic) | "
        "held-out exact match |",
        "|---|---|---|---|",
        f"| plain | {p['step_s'] * 1e3:.0f} ms | {p['flops'] / 1e9:.1f} GFLOP | "
        f"{p['accuracy'] * 100:.1f}% |",
        f"| Skip-FFN ({sk['retained']} retained / {sk['skipped']} skipped of 144) | "
        f"{s['step_s'] * 1e3:.0f} ms ({dt:+.0%}) | {s['flops'] / 1e9:.1f} GFLOP ({df:+.0%}) | "
        f"{s['accuracy'] * 100:.1f}% |",
    ]
    return "\n".join(rows) + (
        f"\n\nMedian of {report['steps_timed']} interleaved steps of {report['batch_size']} "
        f"conversations each, {report['threads']} CPU thread(s), {report['device']}. The paper "
        f"reports -22% to -36% training time for Skip-FFN SFT. Accuracy: greedy answers to "
        f"{report['n_test']} held-out questions (plain model without, Skip-FFN model with "
        f"Skip-Vision).")


def write_readme(text: str, readme: Path):
    src = readme.read_text()
    block = f"{TABLE_BEGIN}\n{text}\n{TABLE_END}"
    if TABLE_BEGIN in src:
        head, rest = src.split(TABLE_BEGIN, 1)
        src = head + block + rest.split(TABLE_END, 1)[1]
    else:
        raise SystemExit(f"{readme} has no {TABLE_BEGIN} marker under '## Training'")
    readme.write_text(src)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "tiny-llava"))
    p.add_argument("--plain-out", default=str(ROOT / "checkpoints" / "tiny-llava-plain"))
    p.add_argument("--work", default=str(ROOT / "runs" / "tiny-llava"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--stage1-steps", type=int, default=3000)
    p.add_argument("--stage2-steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true",
                   help="keep the shipped checkpoints: re-score them, re-time both SFT "
                   "variants from the plain weights for --time-steps steps, rewrite the table (the "
                   "Skip-FFN setting is the shipped skip_config.json; the flags are ignored)")
    p.add_argument("--time-steps", type=int, default=40)
    p.add_argument("--stage1-from", help="a stage-1 checkpoint directory (runs/.../stage1/"
                   "step-N) to start stage 2 from instead of training stage 1")
    p.add_argument("--retained", type=int, default=SKIP.retained, help="Skip-FFN N_r")
    p.add_argument("--skipped", type=int, default=SKIP.skipped, help="Skip-FFN N_s")
    p.add_argument("--merge-order", default=SKIP.merge_order, choices=("redundancy", "spatial"))
    p.add_argument("--mask", default=SKIP.mask, choices=("causal", "consistent"))
    a = p.parse_args(argv)
    skip = SkipConfig(retained=a.retained, skipped=a.skipped, summary=SKIP.summary,
                      merge_order=a.merge_order, mask=a.mask)
    torch.set_num_threads(a.threads)
    work, out, plain_out = Path(a.work), Path(a.out), Path(a.plain_out)
    t_start = time.perf_counter()
    paths = make_data(work, a.n_train, a.n_test, a.seed)
    if a.table_only:
        plain, proc = load_pretrained(plain_out)
        skip_model, _ = load_pretrained(out)
        skip = load_skip_config(out)
        stage2_steps = a.time_steps
    elif a.stage1_from:
        plain, proc = load_pretrained(a.stage1_from)
        stage2_steps = a.stage2_steps
    else:
        tok = build_tokenizer()
        model, proc = build_model(tiny_config(tok.get_vocab_size()), tok, a.seed)
        sincos_positions_(model)
        stage1 = load_conversations(paths["stage1"], proc)
        cfg1 = TrainConfig(steps=a.stage1_steps, batch_size=a.batch_size, lr=2e-3, min_lr=1e-4,
                           warmup_steps=100, train=("vision_tower", "projector",
                                                    "language_model"), seed=a.seed)
        print(f"stage 1: {a.stage1_steps} steps from scratch, no Skip-Vision", file=sys.stderr)
        fit(Trainer(model, stage1, cfg1, None, proc.pad_token_id), work / "stage1", proc,
            eval_data=load_conversations(paths["test"], proc), eval_every=500,
            save_every=250, keep_last=1)
        plain = model
        stage2_steps = a.stage2_steps
    test = load_conversations(paths["test"], proc)
    train = load_conversations(paths["train"], proc)
    cfg2 = TrainConfig(steps=stage2_steps, batch_size=a.batch_size, lr=1e-3, min_lr=5e-5,
                       warmup_steps=min(50, stage2_steps // 4), seed=a.seed + 1)
    runs = {"plain": (copy.deepcopy(plain), None),
            "skip_ffn": (with_summary_scorer(copy.deepcopy(plain)), skip)}
    print(f"stage 2: {stage2_steps} steps of plain and Skip-FFN SFT, interleaved",
          file=sys.stderr)
    timed = side_by_side(runs, train, cfg2)
    if not a.table_only:
        plain, skip_model = runs["plain"][0], runs["skip_ffn"][0]
    report = {"steps_timed": stage2_steps, "batch_size": a.batch_size, "threads": a.threads,
              "device": "CPU", "n_train": a.n_train, "n_test": len(test), "seed": a.seed,
              "skip": asdict(skip)}
    first = paths["test"].with_name("test-first-300.jsonl")  # what the shipped-model test uses
    first.write_text("".join(x + "\n" for x in paths["test"].read_text().splitlines()[:300]))
    first_300 = load_conversations(first, proc)
    for name, model, s in [("plain", plain, None), ("skip_ffn", skip_model, skip)]:
        own, other = evaluate(model, test, s, 100), evaluate(model, test, None if s else skip,
                                                              100)
        report[name] = {"step_s": statistics.median(timed["times"][name]),
                        "flops": training_flops(runs[name][0], train, a.batch_size, s),
                        "accuracy": own.accuracy, "by_type": own.by_type(),
                        "accuracy_" + ("without" if s else "with") + "_skip_vision":
                            other.accuracy}
        report[name]["accuracy_first_300"] = evaluate(model, first_300, s, 100).accuracy
        print(f"{name}: exact match {own.accuracy:.4f} {own.by_type()}", file=sys.stderr)
    if a.table_only and (out / "training_report.json").is_file():
        report = json.loads((out / "training_report.json").read_text()) | report
    if not a.table_only:
        save_pretrained(plain, plain_out, proc)
        save_pretrained(skip_model, out, proc, skip=skip)
        scene, question, answer = sample(a.seed)
        render(scene).save(out / "sample.png")
        report["sample"] = {"image": "sample.png", "question": question, "answer": answer,
                            "answers": sample_answers(skip_model, proc, out / "sample.png",
                                                      question, skip)}
        report["wall_time_s"] = time.perf_counter() - t_start
    report["command"] = " ".join(["python examples/make_shipped_model.py", *(
        sys.argv[1:] if argv is None else argv)])
    if a.stage1_from:
        report["note"] = ("stage 1 loaded from --stage1-from (a stage-1 checkpoint of an earlier "
                          "run of this recipe); wall_time_s covers stage 2 and scoring only")
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    text = table(report)
    write_readme(text, Path(a.readme))
    print(text)


if __name__ == "__main__":
    run_main(main)
