"""An offline, randomly initialised BLIP-2 captioner (ViT → Q-Former → OPT) for tests, the demo
and benchmarks.

It is saved with `save_pretrained`, so the trainer loads it through `Blip2Processor.from_pretrained`
and `Blip2ForConditionalGeneration.from_pretrained` exactly like `Salesforce/blip2-opt-2.7b`; only
the layer sizes differ. Its captions are gibberish: it proves the mechanics, not the words.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .tiny import _byte_symbols

IMAGE_SIZE = 32  # pixels the processor resizes every image to
NUM_QUERY_TOKENS = 4  # Q-Former queries = image tokens the language model sees (32 in the real model)

# OPT's special tokens sit at the start of its vocabulary, in this order.
_OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def build_opt_tokenizer():
    """A GPT-2/OPT byte-level BPE tokenizer made offline: the 256 byte symbols, merges for a space
    followed by a letter and for common letter pairs, and OPT's special tokens (`</s>` starts
    every text, as in OPT)."""
    from transformers import GPT2Tokenizer

    vocab = {tok: i for i, tok in enumerate(_OPT_SPECIALS)}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    space = _byte_symbols()[ord(" ")]  # "Ġ": byte-level BPE's spelling of a leading space
    merges = []
    for a in [space, *"e t a o i n s r h l".split()]:
        for b in string.ascii_lowercase:
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>", add_bos_token=True, model_max_length=64)


def _unprintable_ids(tokenizer, vocab_size: int, keep: int) -> list[int]:
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = []
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id])
        printable = token_id not in special and text.isascii() and text.isprintable()
        if token_id != keep and not printable:
            ids.append(token_id)
    return ids


def make_blip2(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny BLIP-2 (random weights, seeded) with its processor and save both to `out_dir`."""
    from transformers import (
        BlipImageProcessor,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    out_dir = Path(out_dir)
    tokenizer = build_opt_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # The processor adds the "<image>" token to the tokenizer; the model must know its id.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    vocab_size = len(processor.tokenizer)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    specials = {tok: processor.tokenizer.convert_tokens_to_ids(tok) for tok in ("</s>", "<pad>")}
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=Blip2QFormerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=32),
        text_config=OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              bos_token_id=specials["</s>"], eos_token_id=specials["</s>"],
                              pad_token_id=specials["<pad>"]),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # The real checkpoint's initialiser leaves the vision tower near zero (initializer_range 1e-10);
    # redraw it so different images give different image tokens, and so different captions.
    with torch.no_grad():
        for name, param in model.vision_model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
        # Output logits are the tied word embeddings times the hidden state: zero rows give those
        # tokens logit 0 while some printable token always scores higher, so greedy captions are
        # readable ASCII gibberish rather than control bytes, "<unk>" or "<image>".
        embeddings = model.get_input_embeddings().weight
        for token_id in _unprintable_ids(processor.tokenizer, vocab_size, keep=specials["</s>"]):
            embeddings[token_id].zero_()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
