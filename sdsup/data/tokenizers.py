"""Text tokenizers: a word-level vocabulary for the scenes, CLIP BPE for real data.

Both map a string to a fixed-length int32 id vector (`encode`) and never fail
on odd text: unknown words become the unknown id and over-long prompts are
truncated, each with a logged warning.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np
from absl import logging

from sdsup.data import scenes
from sdsup.errors import SdsupError

PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"
# EOS is deliberately not id 2: transformers' CLIPTextModel pools with the
# legacy argmax-of-ids rule when eos_token_id == 2, which would break the
# pooled output of an exported scenes text encoder.
SPECIAL_TOKENS = (PAD, BOS, UNK, EOS)
SCENES_VOCAB_FILE = "scenes_vocab.txt"

_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


class TokenizerError(SdsupError, ValueError):
    pass


class WordTokenizer:
    """Lower-cased words and punctuation, one id each, BOS ... EOS then padding."""

    # The scenes' text encoder is trained here with padding masked out of attention.
    masks_padding = True

    def __init__(self, vocab: Sequence[str], max_length: int):
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise TokenizerError(f"a word vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(vocab)) != len(vocab):
            raise TokenizerError("the word vocabulary has duplicate entries")
        if max_length < 3:
            raise TokenizerError(f"max_length must be at least 3 (BOS, a word, EOS), got {max_length}")
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)
        self.pad_id, self.bos_id, self.unknown_id, self.eos_id = (self.ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: str, max_length: int) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f if line.strip()], max_length)

    @classmethod
    def scenes(cls, max_length: int) -> "WordTokenizer":
        """The shipped vocabulary of the scenes' caption grammar."""
        text = importlib.resources.files("sdsup.data").joinpath(SCENES_VOCAB_FILE).read_text("utf-8")
        return cls([w for w in text.split("\n") if w], max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> np.ndarray:
        words = self.words(text)
        ids = [self.ids.get(w, self.unknown_id) for w in words]
        if self.unknown_id in ids:
            unknown = sorted({w for w in words if w not in self.ids})
            logging.log_every_n_seconds(logging.WARNING, "unknown words %s in prompt %r (mapped to %s)",
                                        10, unknown, text[:80], UNK)
        room = self.max_length - 2
        if len(ids) > room:
            logging.log_every_n_seconds(logging.WARNING, "prompt of %d tokens truncated to %d: %r",
                                        10, len(ids), room, text[:80])
            ids = ids[:room]
        out = np.full(self.max_length, self.pad_id, np.int32)
        out[: len(ids) + 2] = [self.bos_id] + ids + [self.eos_id]
        return out

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts])

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else UNK)
        return re.sub(r" ([.,])", r"\1", " ".join(words))


class ClipTokenizer:
    """CLIP's BPE tokenizer from a local directory (transformers layout).

    `masks_padding` is False: Stable Diffusion's text encoder always sees the
    whole padded sequence (pad = <|endoftext|>), and a padding mask would also
    hide the real end-of-text token.

    Loaded with `CLIPTokenizer.from_pretrained(dir, local_files_only=True)`:
    in transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` silently
    builds a 2-token vocabulary that maps every word to <|endoftext|>, so the
    constructor is never used and the loaded vocabulary is checked.
    """

    masks_padding = False

    def __init__(self, path: str, max_length: int = 77):
        if not os.path.isdir(path):
            raise TokenizerError(f"CLIP tokenizer directory not found: {path}")
        from transformers import CLIPTokenizer  # deferred: transformers is heavy; only CLIP-tokenized runs need it

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise TokenizerError(f"cannot load a CLIP tokenizer from {path}: {type(e).__name__}: {e}") from e
        self.max_length = int(max_length)
        self.unknown_id = self.tokenizer.unk_token_id
        # Stable Diffusion pads with <|endoftext|> when no pad token is set.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        probe = self.tokenizer("a photo of a cat", add_special_tokens=False)["input_ids"]
        if len(self.tokenizer) < 100 or not probe or self.unknown_id in probe:
            raise TokenizerError(
                f"the CLIP tokenizer in {path} maps common words to the unknown id "
                f"(vocabulary of {len(self.tokenizer)} tokens): its vocab.json/merges.txt are broken")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if self.unknown_id is not None and self.unknown_id in ids[1:-1]:
            logging.log_every_n_seconds(logging.WARNING, "prompt %r has tokens outside the CLIP vocabulary",
                                        10, text[:80])
        if len(ids) > self.max_length:
            logging.log_every_n_seconds(logging.WARNING, "prompt of %d tokens truncated to %d: %r",
                                        10, len(ids), self.max_length, text[:80])
            ids = ids[: self.max_length - 1] + [self.eos_id]
        out = np.full(self.max_length, self.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def build(kind: str, *, max_length: int, path: Optional[str] = None):
    """The tokenizer a config names: "scenes_words" or "clip" (with a path)."""
    if kind == "scenes_words":
        return WordTokenizer.scenes(max_length) if not path else WordTokenizer.from_file(path, max_length)
    if kind == "clip":
        if not path:
            raise TokenizerError("the clip tokenizer needs config.text.tokenizer_path (a local directory)")
        return ClipTokenizer(path, max_length)
    raise TokenizerError(f"unknown tokenizer {kind!r}; expected 'scenes_words' or 'clip'")


def write_scenes_vocab(path: str) -> None:
    """Regenerates the shipped vocabulary from the caption grammar."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(list(SPECIAL_TOKENS) + scenes.grammar_words()) + "\n")
