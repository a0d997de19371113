"""A small LLaMA-style tokenizer built with `tokenizers` (no downloads): BPE with byte
fallback over "▁"-marked spaces, BOS added by the post-processor, `<image>` and `<pad>` as
added special tokens at the end of the vocabulary, as in llava-hf's tokenizer.json."""
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

CORPUS = ["What is in the image? A cat sits on a red mat next to two dogs.",
          "Describe the picture in detail. How many shapes are there?",
          "USER: ASSISTANT: the a an of to in is are yes no left right above below 0123456789"]


def tiny_tokenizer(vocab_size: int = 400, added=("<image>", "<pad>")) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False))
    tok.add_special_tokens(list(added))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def as_transformers(tok: Tokenizer):
    """The same tokenizer wrapped for transformers (LlavaProcessor's tokenizer)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
