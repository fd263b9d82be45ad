"""Tiny text encoders built from transformers configs with random weights, in an SD3 pipeline's
layout (text_encoder/, text_encoder_2/, text_encoder_3/ with their tokenizers): no downloads."""

from pathlib import Path

WORDS = "a photo of an the sandal sneaker bag shirt black-and-white picture".split()
CLIP_WIDTHS = ((32, 24), (48, 40))  # (hidden, projection) of the two CLIPs
T5_WIDTH = 96  # SD3's T5 is the widest encoder (4096 vs 768 + 1280)


def save_tokenizer(path):
    """A word-level tokenizer (pad 0, bos 1, unk 2, eos 3): what a CLIP/T5 tokenizer gives a model."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                model_max_length=16)  # fmt: skip
    fast.save_pretrained(path)


def save_encoders(root: Path) -> dict[str, Path]:
    """Two CLIPs and a T5 under `root` as an SD3 pipeline lays them out."""
    import torch
    import transformers

    torch.manual_seed(0)
    vocab = len(WORDS) + 4
    dirs = {}
    for i, (width, proj) in enumerate(CLIP_WIDTHS):
        suffix = "" if i == 0 else f"_{i + 1}"
        cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                          projection_dim=proj, eos_token_id=3, bos_token_id=1,
                                          pad_token_id=0)  # fmt: skip
        transformers.CLIPTextModelWithProjection(cfg).save_pretrained(root / f"text_encoder{suffix}")
        save_tokenizer(root / f"tokenizer{suffix}")
        dirs["clip_l" if i == 0 else "clip_g"] = root / f"text_encoder{suffix}"
    t5 = transformers.T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                               pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)  # fmt: skip
    transformers.T5EncoderModel(t5).save_pretrained(root / "text_encoder_3")
    save_tokenizer(root / "tokenizer_3")
    dirs["t5"] = root / "text_encoder_3"
    return dirs
