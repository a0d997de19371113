"""Peak resident memory while loading a checkpoint, relative to its file size.

    python examples/bench_load_memory.py --mb 300

Writes a random LLaVA checkpoint of about --mb MB (float32, llava-hf layout), then loads it
in fresh processes and reports each one's resident-memory increase at its peak (VmHWM after
resetting it, minus VmRSS before loading) divided by the size of model.safetensors:
`load_pretrained` (meta-device build, each tensor read once into its own buffer and assigned)
and, for comparison, the naive way (allocate the model, `safetensors.torch.load_file`,
`load_state_dict` copying into it). The page cache is not resident memory of the process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from cli import Parser, run_main  # examples/, next to this file

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def config(mb: int):
    """A LLaVA-shaped config of about `mb` MB in float32 (width 768; layers scale with mb)."""
    from skipvision import LlavaConfig, TextConfig, VisionConfig
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048  # attention + SwiGLU weights
    layers = max(1, round((mb * 2**20 / 4 - 2 * 16000 * 768 - 3_300_000) / per_layer))
    return LlavaConfig(vision=VisionConfig(hidden_size=256, intermediate_size=1024,
                                           num_hidden_layers=4, num_attention_heads=4,
                                           image_size=224, patch_size=16),
                       text=TextConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048,
                                       num_hidden_layers=layers, num_attention_heads=12))


def make(directory: str, mb: int):
    import torch
    from skipvision import Llava, save_pretrained
    torch.manual_seed(0)
    save_pretrained(Llava(config(mb)), directory)


def measure(directory: str, how: str):
    import torch  # noqa: F401 - imported before the baseline is taken
    from skipvision import Llava, load_pretrained
    from skipvision.io.hf_config import from_hf
    from skipvision.io.hub import read_json
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = status_kib("VmRSS")
    if how == "load_pretrained":
        model, _ = load_pretrained(directory)
    else:
        from safetensors.torch import load_file
        model = Llava(from_hf(read_json(Path(directory) / "config.json")))
        model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    peak = status_kib("VmHWM")
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"how": how, "rss_before": before * 1024, "peak": peak * 1024,
                      "increase": (peak - before) * 1024, "params": n}))


def run(*args) -> str:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return out.stdout


def main(argv=None) -> dict:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=300, help="checkpoint size in MB (default 300)")
    p.add_argument("--naive", action="store_true", help="also measure the naive loader")
    p.add_argument("--_make", help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._make:
        return make(a._make, a.mb)
    if a._measure:
        return measure(*a._measure)
    with tempfile.TemporaryDirectory() as d:
        run("--_make", d, "--mb", str(a.mb))
        size = (Path(d) / "model.safetensors").stat().st_size
        report = {"file_bytes": size}
        for how in ["load_pretrained"] + (["naive"] if a.naive else []):
            r = json.loads(run("--_measure", d, how))
            report[how] = r | {"ratio": round(r["increase"] / size, 3)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_main(main)
