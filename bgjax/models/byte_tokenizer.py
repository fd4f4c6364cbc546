"""A byte-level CLIP tokenizer with no merges, for small models trained from scratch (and tests).

Every UTF-8 byte is one token, so any category name is encodable and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_ID, EOS_ID = 512, 513
VOCAB_SIZE = 514


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_byte_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A `CLIPTokenizer` folder: ids 0-511 are bytes (with and without the end-of-word mark),
    512 is BOS and 513 EOS, also padding unless `pad_token` says otherwise (SDXL's second tokenizer
    pads with "!")."""
    chars = byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer"}))
    return folder
