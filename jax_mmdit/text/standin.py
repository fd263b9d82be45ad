"""A stand-in text encoder for machines without pretrained weights: a small CLIP text model with
seeded random weights and a word-level tokenizer over the captions' words, saved in the same
layout as a real CLIP directory (config.json, weights, tokenizer), so everything downstream runs
exactly as it would with CLIP-L. Its embeddings carry no language knowledge: each word is a fixed
random vector mixed by two random layers, which is enough to tell "sandal" from "sneaker".
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = ("<pad>", "<bos>", "<unk>", "<eos>")


def words_of(texts: list[str]) -> list[str]:
    """The vocabulary: every whitespace-separated word of `texts`, lower-cased, sorted."""
    return sorted({w for t in texts for w in t.lower().split()})


def save_standin_encoder(path: str | Path, texts: list[str], width: int = 64, max_length: int = 16,
                         seed: int = 0) -> Path:  # fmt: skip
    """Write the stand-in CLIP (hidden and projection `width`, 2 layers) to `path`; returns it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    path = Path(path)
    vocab = {w: i for i, w in enumerate(SPECIAL)} | {w: i + len(SPECIAL) for i, w in enumerate(words_of(texts))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 1), ("<eos>", 3)])  # fmt: skip
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                model_max_length=max_length)  # fmt: skip
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                                      projection_dim=width, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=3)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
