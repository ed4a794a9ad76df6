"""Offline tokenizers for the kit's own text encoders, and truncation-aware tokenizing.

The real base uses OpenCLIP's BPE tokenizer, which is downloaded with it. Tiny models the
kit builds for tests and demos need a tokenizer that exists without a download and still
reads Chinese captions: a byte-level CLIP vocabulary (every UTF-8 byte, plain and
word-final, no merges) tokenizes any text at three tokens per CJK character, and a
character-level BERT vocabulary (for the ``chinese_clip`` encoder kind) at one.

Sticker captions are long (60-150 characters), so :func:`tokenize` warns whenever a
caption is cut to fit the context instead of silently dropping its end.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import BertTokenizer, CLIPTokenizer, PreTrainedTokenizerBase

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


class CaptionTruncatedWarning(UserWarning):
    """A caption had more tokens than the text encoder's context and was cut."""


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in byte order (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbol = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbol:
            symbol[b] = chr(256 + extra)
            extra += 1
    return [symbol[b] for b in range(256)]


def build_byte_tokenizer(model_max_length: int = 128) -> CLIPTokenizer:
    """A CLIP tokenizer over raw UTF-8 bytes: 256 symbols x {inside word, word end} + BOS/EOS = 514 ids."""
    if model_max_length < 3:
        raise ValueError(f"model_max_length={model_max_length}: need room for BOS, one token and EOS")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab[BOS_TOKEN] = 512
    vocab[EOS_TOKEN] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_char_tokenizer(model_max_length: int = 128) -> BertTokenizer:
    """A BERT tokenizer with one id per ASCII or CJK character, for tiny ``chinese_clip`` encoders."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ascii_chars = [chr(c) for c in range(33, 127)]
    cjk = [chr(c) for c in (*range(0x3000, 0x3040), *range(0x4E00, 0xA000), *range(0xFF00, 0xFFF0))]
    tokens = specials + ascii_chars + ["##" + c for c in ascii_chars] + cjk
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=model_max_length)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate ``texts`` to the tokenizer's ``model_max_length``; warn for each caption that was cut.

    Returns ``(input_ids, attention_mask)``, both ``(len(texts), model_max_length)`` int64.
    """
    max_length = tokenizer.model_max_length
    full = tokenizer(list(texts), truncation=False, verbose=False).input_ids
    for text, ids in zip(texts, full):
        if len(ids) > max_length:
            kept = tokenizer.decode(ids[: max_length - 1], skip_special_tokens=True)
            warnings.warn(
                f"caption truncated from {len(ids)} to {max_length} tokens; the model reads only {kept!r} "
                f"of {text!r} (give the text encoder a longer context via max_text_length)",
                CaptionTruncatedWarning,
                stacklevel=3,
            )
    batch = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.input_ids, batch.attention_mask
