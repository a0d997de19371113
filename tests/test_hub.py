"""load_pretrained through the real huggingface_hub download path, against a Hub cache laid
out by hand in a temporary directory (models--ORG--NAME/refs + snapshots), offline.

Every layout a LLaVA checkpoint comes in is written by transformers itself from one tiny
random model, and each must give transformers' logits to 1e-9 in float64.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import assert_close, build_hf, hf_specs, llava_inputs, offline_cache, publish
from skipvision import load_pretrained
from skipvision.errors import CheckpointError

SENTINEL = -200  # original LLaVA's image placeholder


def _rewrite(path: Path, rename):
    with safe_open(str(path), "pt") as f:
        sd = {rename(k): f.get_tensor(k) for k in f.keys()}
    sd = {k: v for k, v in sd.items() if k is not None}
    save_file(sd, str(path), metadata={"format": "pt"})


def save_layouts(hf, root: Path) -> dict[str, Path]:
    """The tiny model `hf` saved in every llava-hf layout; name -> directory."""
    out = {k: root / k for k in ("single", "sharded", "vision_model", "in_memory")}
    hf.save_pretrained(out["single"])  # transformers 5: vision_tower.* without vision_model.
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf.save_pretrained(out["sharded"], max_shard_size=max(nbytes // 3, 1))
    assert (out["sharded"] / "model.safetensors.index.json").is_file()
    shutil.copytree(out["single"], out["vision_model"])  # the llava-hf Hub spelling
    _rewrite(out["vision_model"] / "model.safetensors",
             lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    out["in_memory"].mkdir()  # transformers 5's in-memory `model.` names, saved as they are
    shutil.copy(out["single"] / "config.json", out["in_memory"])
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if hf.config.text_config.tie_word_embeddings:
        del sd["lm_head.weight"]
    save_file(sd, str(out["in_memory"] / "model.safetensors"))
    return out


def save_original(hf, root: Path, clip_repo: str, pickles: bool = False) -> tuple[Path, Path]:
    """The same model in the original LLaVA format: a LLaMA saved by transformers plus
    `model.mm_projector.{0,2}`, `mm_*` config fields, and a separate CLIP repo."""
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM
    llm_dir, clip_dir = root / "original", root / "clip"
    llama = LlamaForCausalLM(hf.config.text_config).to(torch.float64)
    llama.model.load_state_dict(hf.model.language_model.state_dict())
    llama.lm_head.load_state_dict(hf.lm_head.state_dict())
    llama.save_pretrained(llm_dir)
    with safe_open(str(llm_dir / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            sd[f"model.mm_projector.{i}.{p}"] = getattr(hf.model.multi_modal_projector, name) \
                .state_dict()[p]
    if pickles:  # two .bin shards with an index, as liuhaotian's repos have
        (llm_dir / "model.safetensors").unlink()
        keys = sorted(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
                  "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, llm_dir / name)
        (llm_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    else:
        save_file(sd, str(llm_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((llm_dir / "config.json").read_text())
    feature = {"default": "patch", "full": "cls_patch"}[hf.config.vision_feature_select_strategy]
    config.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"],
                  mm_vision_tower=clip_repo, mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=hf.config.vision_config.hidden_size,
                  mm_vision_select_layer=hf.config.vision_feature_layer,
                  mm_vision_select_feature=feature, mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, image_aspect_ratio="pad", mm_patch_merge_type="flat")
    (llm_dir / "config.json").write_text(json.dumps(config))
    text = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=20, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    clip = CLIPModel(CLIPConfig(vision_config=hf.config.vision_config.to_dict(),
                                text_config=text, projection_dim=4)).to(torch.float64)
    clip.vision_model.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(clip_dir)  # vision_model.*, text_model.*, projections, logit_scale
    return llm_dir, clip_dir


def _logits_match(model, hf, seed, sentinel=False):
    ids, mask, pos, px = llava_inputs(model.cfg if not sentinel else hf_cfg_view(hf), seed, [3, 6])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos,
                  output_hidden_states=True).logits
        ours_ids = ids.masked_fill(ids == hf.config.image_token_id, SENTINEL) if sentinel else ids
        got = model(ours_ids, px, mask, pos)
    valid = mask.bool()
    assert_close(got[valid], want[valid], 1e-9 * max(1.0, want.abs().max().item()), "logits")


def hf_cfg_view(hf):
    from skipvision import from_hf
    return from_hf(hf.config.to_dict())


TINY = dict(text=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=50,
                      rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False),
            vision=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, image_size=4, patch_size=2),
            image_token_id=49, vision_feature_layer=-2, vision_feature_select_strategy="default")
TINY_TIED_FULL = TINY | dict(text=TINY["text"] | dict(tie_word_embeddings=True),
                             vision_feature_layer=-1, vision_feature_select_strategy="full")


@settings(max_examples=4)
@given(spec=hf_specs(max_layers=2), seed=st.integers(0, 2**16))
@example(spec=TINY_TIED_FULL, seed=0)
def test_every_layout_loads_from_the_hub_cache_and_matches_transformers(spec, seed):
    hf = build_hf(spec, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cache = Path(tmp), Path(tmp) / "hub"
        repos = {f"llava-hf/tiny-{name}": d for name, d in save_layouts(hf, tmp / "src").items()}
        llm, clip = save_original(hf, tmp / "src", "openai/tiny-clip")
        llm_bin, _ = save_original(hf, tmp / "src_bin", "openai/tiny-clip", pickles=True)
        originals = {"liuhaotian/tiny-llava": llm, "liuhaotian/tiny-llava-bin": llm_bin}
        for repo, src in {**repos, **originals, "openai/tiny-clip": clip}.items():
            publish(cache, repo, src)
        with offline_cache(cache):
            for repo in repos:
                model, _ = load_pretrained(repo)
                assert next(model.parameters()).dtype == torch.float64, repo
                _logits_match(model, hf, seed)
            for repo in originals:
                model, processor = load_pretrained(repo)
                assert model.cfg.image_token_id == SENTINEL
                assert processor.image.pad_to_square and processor.template == "vicuna_v1"
                _logits_match(model, hf, seed, sentinel=True)
            if spec["text"]["tie_word_embeddings"]:
                lm = model.language_model
                assert lm.lm_head.weight is lm.model.embed_tokens.weight


@pytest.fixture(scope="module")
def tiny_hub():
    """A cache with one tiny llava-hf repo at two revisions (main and tag v1)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cache = Path(tmp), Path(tmp) / "hub"
        hf0, hf1 = build_hf(TINY, 0), build_hf(TINY, 1)
        hf0.save_pretrained(tmp / "v0")
        hf1.save_pretrained(tmp / "v1")
        commit0 = publish(cache, "org/tiny", tmp / "v0")
        commit1 = publish(cache, "org/tiny", tmp / "v1", revision="v1")
        yield dict(cache=cache, tmp=tmp, hf=(hf0, hf1), commits=(commit0, commit1))


def test_revisions_resolve_by_branch_tag_and_commit(tiny_hub):
    hf0, hf1 = tiny_hub["hf"]
    with offline_cache(tiny_hub["cache"]):
        _logits_match(load_pretrained("org/tiny")[0], hf0, 3)
        _logits_match(load_pretrained("org/tiny", revision="v1")[0], hf1, 3)
        _logits_match(load_pretrained("org/tiny", revision=tiny_hub["commits"][1])[0], hf1, 3)


def test_environment_variables_select_cache_and_offline_mode(tiny_hub):
    """The user's way: HF_HUB_CACHE and HF_HUB_OFFLINE in the environment of a fresh process."""
    code = ("import torch, skipvision; m, _ = skipvision.load_pretrained('org/tiny', "
            "revision='v1'); print(float(sum(p.double().sum() for p in m.parameters())))")
    env = dict(os.environ, HF_HUB_CACHE=str(tiny_hub["cache"]), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    want = float(sum(p.double().sum() for p in tiny_hub["hf"][1].parameters()))
    assert abs(float(out.stdout.split()[-1]) - want) <= 1e-9 * abs(want)


def test_unknown_repo_and_revision_are_named(tiny_hub):
    with offline_cache(tiny_hub["cache"]):
        with pytest.raises(CheckpointError, match=r"'org/absent'.*not in the Hugging Face cache"
                                                  r".*offline"):
            load_pretrained("org/absent")
        with pytest.raises(CheckpointError, match=r"'org/tiny' at revision 'v9'"):
            load_pretrained("org/tiny", revision="v9")
        with pytest.raises(CheckpointError, match="neither a local directory nor a valid Hub"):
            load_pretrained("org/bad name!")
        with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
            load_pretrained("./no/such/dir")


def _broken_copy(tiny_hub, repo, edit):
    src = tiny_hub["tmp"] / repo.replace("/", "_")
    shutil.copytree(tiny_hub["tmp"] / "v0", src)
    edit(src)
    publish(tiny_hub["cache"], repo, src)


def test_missing_files_in_a_cached_snapshot_are_named(tiny_hub):
    _broken_copy(tiny_hub, "org/no-config", lambda d: (d / "config.json").unlink())
    _broken_copy(tiny_hub, "org/no-weights", lambda d: (d / "model.safetensors").unlink())

    def lose_shard(d):
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _broken_copy(tiny_hub, "org/lost-shard", lose_shard)
    with offline_cache(tiny_hub["cache"]):
        with pytest.raises(CheckpointError, match="config.json is missing"):
            load_pretrained("org/no-config")
        with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors"):
            load_pretrained("org/no-weights")
        with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
            load_pretrained("org/lost-shard")
