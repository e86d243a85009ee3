"""A CLIP tokenizer directory (transformers layout: vocab.json, merges.txt) for the input benchmark.

The benchmark tokenizes with CLIP's BPE. Its vocabulary is taken, in order, from
  * SDSUP_CLIP_TOKENIZER: a directory in transformers' layout (e.g. the `tokenizer/` folder of a local
    Stable Diffusion 1.5 copy), used as it is;
  * SDSUP_CLIP_BPE: open_clip's `bpe_simple_vocab_16e6.txt.gz` (in the `open_clip_torch` wheel), turned
    into vocab.json + merges.txt the way CLIP's own tokenizer reads it: the 256 byte symbols, the same
    with "</w>", the first 48,894 merges' results, then <|startoftext|> and <|endoftext|> (49,408 ids);
  * otherwise the byte alphabet alone (514 ids, no merges). It is the same code path on the same text,
    but with no merges to apply it tokenizes somewhat faster than the real vocabulary: the result line says
    which vocabulary ran.
"""

import gzip
import json
import os

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary of 49,408 = 2 x 256 byte symbols + merges + 2 specials
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write(out_dir: str, merges: list) -> str:
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": SPECIALS[0],
                   "eos_token": SPECIALS[1], "unk_token": SPECIALS[1], "pad_token": SPECIALS[1]}, f)
    return out_dir


def tokenizer_dir(scratch: str):
    """(directory, description) of the CLIP vocabulary the benchmark uses."""
    given = os.environ.get("SDSUP_CLIP_TOKENIZER")
    if given:
        return given, f"CLIP BPE from {given}"
    bpe = os.environ.get("SDSUP_CLIP_BPE")
    if bpe:
        with gzip.open(bpe, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1:NUM_MERGES + 1]
        return write(os.path.join(scratch, "clip_tokenizer"), merges), "CLIP BPE (49,408 ids) from open_clip's file"
    return write(os.path.join(scratch, "clip_tokenizer"), []), "CLIP-format byte alphabet only (514 ids, no merges)"
