"""Word-level and CLIP BPE tokenizers: round trips, odd input, the CLIP trap."""

import json
import os

import numpy as np
import pytest
from absl import logging

from sdsup.data import scenes, tokenizers
from helpers import write_clip_tokenizer


@pytest.fixture
def absl_warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "log_every_n_seconds", lambda level, msg, n, *args: seen.append(msg % args))
    return seen


def test_word_tokenizer_round_trips_every_caption_shape():
    tok = tokenizers.WordTokenizer.scenes(64)
    for i in range(500):
        text = scenes.caption(scenes.sample_scene(scenes.example_rng(0, "test", i), "test"))
        ids = tok.encode(text)
        assert ids.shape == (64,) and ids.dtype == np.int32
        assert tok.unknown_id not in ids
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == text


def test_unknown_words_map_to_unknown_with_a_warning(absl_warnings):
    tok = tokenizers.WordTokenizer.scenes(16)
    ids = tok.encode("A Zebra left of the TREE!")
    words = ["a", "zebra", "left", "of", "the", "tree", "!"]
    assert [tok.vocab[i] for i in ids[1:8]] == ["a", "<unk>", "left", "of", "the", "tree", "<unk>"]
    assert ids[8] == tok.eos_id and (ids[9:] == tok.pad_id).all()
    assert any("zebra" in w for w in absl_warnings), words


def test_over_long_prompt_is_truncated_with_a_warning(absl_warnings):
    tok = tokenizers.WordTokenizer.scenes(8)
    ids = tok.encode("a tree " * 20)
    assert ids.shape == (8,) and ids[-1] == tok.eos_id and tok.pad_id not in ids
    assert any("truncated" in w for w in absl_warnings)


def test_empty_prompt_encodes_to_bos_eos():
    tok = tokenizers.WordTokenizer.scenes(8)
    ids = tok.encode("")
    assert list(ids[:2]) == [tok.bos_id, tok.eos_id] and (ids[2:] == tok.pad_id).all()


def test_clip_tokenizer_loads_from_a_local_directory(tmp_path, absl_warnings):
    path = write_clip_tokenizer(str(tmp_path / "tok"))
    tok = tokenizers.build("clip", max_length=12, path=path)
    ids = tok.encode("a photo of a cat")
    # Known words are single tokens, never the unknown id.
    assert len([i for i in ids if i not in (tok.bos_id, tok.eos_id, tok.pad_id)]) == 5
    assert ids[0] == tok.bos_id and ids.shape == (12,)
    assert tok.decode(ids) == "a photo of a cat"
    long_ids = tok.encode("a photo of a cat " * 10)
    assert long_ids.shape == (12,) and long_ids[-1] == tok.eos_id
    assert any("truncated" in w for w in absl_warnings)


def test_clip_tokenizer_with_a_broken_vocabulary_is_refused(tmp_path):
    path = str(tmp_path / "broken")
    os.makedirs(path)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({"<|startoftext|>": 0, "<|endoftext|>": 1}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}, f)
    with pytest.raises(tokenizers.TokenizerError, match="unknown id"):
        tokenizers.build("clip", max_length=77, path=path)


def test_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(tokenizers.TokenizerError, match="not found"):
        tokenizers.build("clip", max_length=77, path=str(tmp_path / "nope"))
    with pytest.raises(tokenizers.TokenizerError, match="tokenizer_path"):
        tokenizers.build("clip", max_length=77)
    with pytest.raises(tokenizers.TokenizerError, match="unknown tokenizer"):
        tokenizers.build("sentencepiece", max_length=77)
