"""The config.json of the LLaVA-NeXT repos on the Hub, transcribed (sparse, as they are)."""

NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VISION_L14 = dict(hidden_size=1024, image_size=336, intermediate_size=4096, model_type=(
    "clip_vision_model"), num_attention_heads=16, num_hidden_layers=24, patch_size=14,
    projection_dim=768, vocab_size=32000)
REAL = {  # config.json of the Hub repos, transcribed (sparse, as they are)
    "llava-hf/llava-v1.6-vicuna-7b-hf": dict(
        architectures=["LlavaNextForConditionalGeneration"], image_grid_pinpoints=NEXT_PINS,
        image_token_index=32000, model_type="llava_next", projector_hidden_act="gelu",
        text_config=dict(architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
                         model_type="llama", pad_token_id=0, rms_norm_eps=1e-05,
                         torch_dtype="float16", vocab_size=32064),
        torch_dtype="float16", use_image_newline_parameter=True, vision_config=VISION_L14,
        vision_feature_layer=-2, vision_feature_select_strategy="default", vocab_size=32064),
    "llava-hf/llava-v1.6-mistral-7b-hf": dict(
        architectures=["LlavaNextForConditionalGeneration"], image_grid_pinpoints=NEXT_PINS,
        image_token_index=32000, model_type="llava_next", projector_hidden_act="gelu",
        text_config=dict(architectures=["MistralForCausalLM"], intermediate_size=14336,
                         max_position_embeddings=32768, model_type="mistral",
                         num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=1000000.0,
                         sliding_window=None, torch_dtype="bfloat16", vocab_size=32064),
        torch_dtype="float16", use_image_newline_parameter=True, vision_config=VISION_L14,
        vision_feature_layer=-2, vision_feature_select_strategy="default", vocab_size=32064),
}
