"""Ask a LLaVA checkpoint about an image, with or without Skip-Vision, and see what it cost.

    python examples/generate.py              # the small shipped model, without and with Skip-Vision
    python examples/generate.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg \\
        --prompt "What is in the image?" --skip sv-llava-100-156 --device cuda

--model is a Hub repo id (llava-hf or original LLaVA, downloaded into the Hugging Face cache;
HF_HUB_OFFLINE / HF_HUB_CACHE / HF_TOKEN apply) or a local checkpoint directory. The answer
streams as it is generated; then the report: prompt and image tokens, tokens kept, time to
first token, tokens/s, KV-cache bytes (and bytes Skip-KV saved), peak memory, FLOPs.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from skipvision import flops, load_pretrained
from skipvision.io.hub import in_folder
from skipvision.io.loading import load_skip_config
from skipvision.io.processor import TEMPLATES
from skipvision import fast
from skipvision.analysis.flops import counted_prefill, counted_prepare, lm_weight_params
from skipvision.analysis.roofline import matmul_throughput, memory_bandwidth
from skipvision.pruning import METHODS, Prune
from skipvision.pruning import name as policy_name
from skipvision.skip import PRESETS, SkipConfig

from cli import Parser, fail, run_main  # examples/, next to this file

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava"


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub repo id or checkpoint directory (default: the shipped "
                   "tiny model)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--image", help="image path or http(s) URL (default: the sample image the "
                   "checkpoint directory ships, if any)")
    p.add_argument("--prompt", help="the question; '<image>' marks where the image goes "
                   "(default: before the question); default: the checkpoint's sample question")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="chat template (default: llava for llava-hf, vicuna_v1 for original)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on "
                   "CUDA), float32, float16, bfloat16, float64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--offline", action="store_true", help="never use the network (cache only)")
    p.add_argument("--report", choices=["text", "json"], default="text",
                   help="how to print the cost report (default: text)")
    s = p.add_argument_group("Skip-Vision")
    s.add_argument("--skip", help=f"preset ({', '.join(PRESETS)}), 'checkpoint' (the directory's "
                   "skip_config.json), none, or both (none, then checkpoint); default: both "
                   "for the shipped model, else none")
    s.add_argument("--retained", type=int, help="N_r retained image tokens (overrides preset)")
    s.add_argument("--skipped", type=int, help="N_s skipped (merged) tokens (overrides preset)")
    s.add_argument("--mask", choices=["causal", "consistent"], help="text-to-skipped visibility")
    s.add_argument("--kv", choices=["evict", "keep"], help="Skip-KV: drop skipped tokens' "
                   "keys/values after prefill, or keep them")
    r = p.add_argument_group("training-free pruning (instead of Skip-Vision; plain, then pruned)")
    r.add_argument("--prune", choices=METHODS, help="random, visionzip, divprune (at the LLM's "
                   "input), fastv, dart (inside the LLM after --prune-layer layers)")
    r.add_argument("--budget", type=int, help="image tokens kept per image (with --prune)")
    r.add_argument("--prune-layer", type=int, default=2, help="fastv, dart: K (default: 2)")
    f = p.add_argument_group("speed (skipvision/fast; the same tokens)")
    f.add_argument("--static-cache", action="store_true", help="a pre-allocated KV cache")
    f.add_argument("--compile", action="store_true", help="torch.compile the decode step "
                   "(implies --static-cache; the first step compiles)")
    f.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up at load time")
    s.add_argument("--certify", action="store_true", help="prove (or not) that Skip-FFN and "
                   "Skip-KV leave the greedy answer unchanged (error bound; runs in float64)")
    a = p.parse_args(argv)
    if a.certify and (a.temperature != 0 or a.dtype not in ("auto", "float64")):
        p.error("--certify is about the greedy answer in exact arithmetic: it needs "
                "--temperature 0 and --dtype float64 (auto becomes float64)")
    if a.certify:
        a.dtype = "float64"
    if a.skip not in (None, "none", "checkpoint", "both", *PRESETS):
        p.error(f"--skip {a.skip!r}: choose one of {', '.join(PRESETS)}, checkpoint, both, none")
    custom = [f for f in ("retained", "skipped", "mask", "kv") if getattr(a, f) is not None]
    if a.skip == "none" and custom:
        p.error(f"--{custom[0]} sets Skip-Vision, but --skip none turns it off")
    if (a.prune is None) != (a.budget is None):
        p.error("--prune and --budget go together (a method and the tokens it keeps)")
    if a.prune and (a.skip or custom or a.certify):
        p.error("--prune replaces Skip-Vision: drop --skip, --retained, --skipped, --mask, "
                "--kv and --certify")
    return a


def skip_config(a, name: str) -> SkipConfig | None:
    """The Skip-Vision settings the flags ask for, or None for plain LLaVA."""
    if name == "checkpoint":
        base = load_skip_config(a.model, a.revision, offline=True if a.offline else None)
        if base is None:
            fail(f"--skip checkpoint: {a.model} has no skip_config.json; pass a preset instead")
    else:
        base = PRESETS.get(name)
    custom = {k: v for k, v in dict(retained=a.retained, skipped=a.skipped, mask=a.mask,
                                    kv=a.kv).items() if v is not None}
    if base is None and not custom:
        return None
    return SkipConfig(**(vars(base) if base else {}) | custom)


def checkpoint_example(directory: Path) -> dict:
    """The sample a checkpoint directory ships: example.json, or training_report.json's
    "sample" ({"image": file in the directory, "prompt" or "question": text}); else {}."""
    for name, key in (("example.json", None), ("training_report.json", "sample")):
        if (directory / name).is_file():
            d = json.loads((directory / name).read_text())
            d = d.get(key, {}) if key else d
            if d:
                return d
    return {}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def flops_both_paths(cfg, text_tokens: int, images, skip, new_tokens: int, dtype):
    """Analytic FLOPs (skipvision/analysis/flops.py): plain and Skip-Vision, or plain only when
    no Skip-Vision setting was asked for; `images` a count, or LLaVA-NeXT's (height, width)s.
    The single place this script computes FLOPs."""
    out = flops.compare(cfg, text_tokens, images, skip or SkipConfig(0, 0, summary=False),
                        max(new_tokens, 1), dtype)
    if skip is None:
        out = {part: {"plain": v["plain"]} for part, v in out.items() if "plain" in v}
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.model is None:
        if not SHIPPED.is_dir():
            fail(f"the shipped model {SHIPPED} does not exist yet; pass --model (a Hub id "
                 "such as llava-hf/llava-1.5-7b-hf, or a checkpoint directory)")
        a.model = str(SHIPPED)
        a.skip = a.skip or (None if a.prune else "both")
    both = a.skip == "both"  # plain first, then the checkpoint's settings (flags apply to it)
    skips = [None, skip_config(a, "checkpoint")] if both else [skip_config(a, a.skip or "none")]
    if a.prune:
        skips = [None, Prune(a.prune, a.budget, layer=a.prune_layer)]
    try:
        device = torch.device(a.device)
    except RuntimeError:
        fail(f"--device {a.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {a.device}: no CUDA device here")
    dtype = a.dtype if a.dtype != "auto" else ("float32" if device.type == "cpu" else None)
    t0 = time.perf_counter()
    model, processor = load_pretrained(a.model, a.revision, dtype, device,
                                       offline=True if a.offline else None)
    load_s = time.perf_counter() - t0
    model = fast.fuse(model) if a.fuse else model
    a.step = fast.compiled_step() if a.compile else None  # compiled once, for both runs
    example = checkpoint_example(Path(a.model))
    image = a.image or (str(in_folder(Path(a.model), example["image"], "example image"))
                        if "image" in example else None)
    question = a.prompt or example.get("prompt", example.get("question", "What is in the image?"))
    if image is None:
        fail("--image is required for this checkpoint (it ships no example image)")
    for skip in skips:  # before any work (LLaVA-NeXT's counts depend on the image: later)
        if isinstance(skip, SkipConfig) and not model.cfg.image_grid_pinpoints:
            skip.check(model.cfg.image_seq_length, model.cfg.text.num_hidden_layers)
    inputs = processor(processor.format(question, a.template), [image])
    n_prompt = inputs["input_ids"].shape[1]
    if n_prompt + a.max_new_tokens > model.cfg.text.max_position_embeddings:
        fail(f"prompt ({n_prompt} tokens) + --max-new-tokens ({a.max_new_tokens}) exceeds the "
             f"model's context of {model.cfg.text.max_position_embeddings} tokens")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    runs = []
    for skip in skips:
        if a.report == "text":
            print(f"[{policy_name(skip)}] {question}\n> ", end="")
        runs.append(answer(model, processor, inputs, skip, a))
        if a.report == "text":
            print("\n")
    # the machine's limits, measured once after every run (its buffers stay out of their peaks)
    bw, mm = memory_bandwidth(device, repeats=5), matmul_throughput(device, repeats=5)
    reports = []
    for skip, (r, work) in zip(skips, runs):
        reports.append(dict(model=a.model, image=image, question=question, load_s=round(load_s, 3),
                            **r, **roofline(work, bw, mm)))
        if a.report == "text":
            print(f"[{policy_name(skip)}]")
            for k, v in reports[-1].items():
                if k not in ("answer", "flops", "question"):
                    print(f"{k:>28}: {v}")
            print(f"{'flops':>28}: {json.dumps(r['flops'], default=str)}\n")
    if a.report == "json":
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, default=str))


def answer(model, processor, inputs, skip, a) -> tuple[dict, dict]:
    """Generate (streaming the text when a.report is text); the answer and its costs, and what
    `roofline` needs (the work done, against the time it took)."""
    device = inputs["input_ids"].device
    generator = torch.Generator(device).manual_seed(a.seed)
    new, shown, arrived = [], "", []

    def stream(tok):  # decode everything so far: multi-byte and word-initial pieces print right
        nonlocal shown
        new.append(int(tok[0]))  # reading the token waits for the device
        arrived.append(time.perf_counter())
        text = processor.decode(new)
        if a.report == "text":
            print(text[len(shown):], end="", flush=True)
        shown = text

    t0 = time.perf_counter()
    gen = fast.generate(model, inputs["input_ids"],
                        inputs["pixel_values"].to(model_dtype(model)), inputs["attention_mask"],
                        max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                        top_p=a.top_p, generator=generator, skip=skip, on_token=stream,
                        image_sizes=inputs.get("image_sizes"), compile=a.compile,
                        static=a.static_cache or a.compile, step=a.step)
    n_new, kv = int(gen.lengths[0]), gen.kv_bytes
    decode_s = arrived[n_new - 1] - arrived[0] if n_new > 1 else None
    n_prompt = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"] == model.cfg.image_token_id).sum())
    sizes = inputs.get("image_sizes")  # LLaVA-NeXT: the FLOPs depend on the image's size
    images = 1 if sizes is None else [tuple(s) for s in sizes.tolist()]
    slot = flops.kv_bytes(model.cfg, 1, 1, model_dtype(model))  # one token's K and V, all layers
    inp, prepare_flops = counted_prepare(  # the work of the prefill, counted apart
        model, inputs["input_ids"], inputs["pixel_values"].to(model_dtype(model)),
        inputs["attention_mask"], skip=skip, image_sizes=inputs.get("image_sizes"))
    lm_flops = counted_prefill(model, inp, skip)[0]
    report = dict(
        device=str(device), dtype=str(model_dtype(model)).removeprefix("torch."),
        answer=processor.decode(gen.tokens[0, :n_new]),
        **({"certificate": certificate(model, inputs, skip, gen, a)} if a.certify and skip
           else {}),
        prompt_tokens=n_prompt, image_tokens=n_image, new_tokens=n_new,
        prefill_tokens=gen.prompt_tokens,
        time_to_first_token_s=round(arrived[0] - t0, 4) if arrived else None,
        decode_tokens_per_s=round((n_new - 1) / decode_s, 2) if decode_s else None,
        kv_bytes_prefill=kv["prefill"], kv_bytes=kv["after_eviction"],
        kv_bytes_saved=kv["prefill"] - kv["after_eviction"],
        tokens_kept_in_cache=kv["after_eviction"] // slot,
        peak_memory_bytes=peak_memory_bytes(device),
        skip=None if skip is None else vars(skip),
        flops=(flops_both_paths(model.cfg, n_prompt - n_image, images, skip, n_new,
                                model_dtype(model)) if not isinstance(skip, Prune) else
               {"prefill_counted": lm_flops}))  # analysis/flops.py models Skip-Vision only
    kv_read = (kv["final"] + kv["after_eviction"]) // 2  # the cache a decode step reads, mean
    return report, dict(
        decode_bytes=lm_weight_params(model.cfg.text) * model_dtype(model).itemsize + kv_read,
        tokens_per_s=(n_new - 1) / decode_s if decode_s else None,
        prefill_flops=prepare_flops + lm_flops, ttft=arrived[0] - t0 if arrived else None)


def roofline(work: dict, bandwidth: float, matmul: float) -> dict:
    """Achieved decode bytes/s over the copy bandwidth, and the prefill's counted FLOPs (tower
    and LM) over the time to first token against the matrix-product throughput."""
    out = dict(memory_bandwidth_gb_s=round(bandwidth / 1e9, 2),
               matmul_gflop_s=round(matmul / 1e9, 1))
    if work["tokens_per_s"]:
        out["decode_fraction_of_bandwidth"] = round(
            work["decode_bytes"] * work["tokens_per_s"] / bandwidth, 3)
    if work["ttft"]:
        out["prefill_fraction_of_matmul"] = round(work["prefill_flops"] / work["ttft"] / matmul, 3)
    return out


def certificate(model, inputs, skip, gen, a) -> dict:
    """Corollary 3 of proofs/error_bound.md for this prompt's Skip-Vision answer."""
    from skipvision.analysis.certify import certify, reference_answer
    inp = model.prepare(inputs["input_ids"], inputs["pixel_values"].to(model_dtype(model)),
                        inputs["attention_mask"], skip=skip,
                        image_sizes=inputs.get("image_sizes"))
    c = certify(model, inp, skip, reference_answer(model, inp, a.max_new_tokens))
    same = torch.equal(c.tokens, gen.tokens[0, :int(gen.lengths[0])].cpu())
    worst = int((c.margins / c.bounds.clamp(min=1e-300)).argmin())
    return dict(certified=c.certified, steps_certified=f"{int(c.steps.sum())}/{len(c.steps)}",
                same_answer_as_without_skipping=same,
                weakest_step=dict(step=worst + 1, margin=round(float(c.margins[worst]), 6),
                                  twice_the_bound=round(2 * float(c.bounds[worst]), 6)))


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


if __name__ == "__main__":
    run_main(main)
