"""A corpus's description vectors, computed once by the frozen sentence encoder and read back from its cache."""

import pytest
import torch

from ira.models.text_encoder import load_sentence_encoder
from ira.training import description_vectors
from ira.training.description_vectors import descriptions_pinned, kept_vectors

TEXTS = ["a slow, deep voice with a British accent", "a woman speaking quickly", "a whispering man", "  "]


@pytest.fixture
def encoder():
    """The bundled encoder, with `runs`: how many batches went through its model since the test began (a
    forward hook on the real model, removed after the test: the encoder is shared by the process)."""
    encoder = load_sentence_encoder("bundled")
    runs = [0]
    hook = encoder.model.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    encoder.runs = runs
    yield encoder
    hook.remove()
    del encoder.runs


def test_the_vectors_are_computed_once_then_read_from_the_corpus_cache(encoder, tmp_path):
    texts, vectors = kept_vectors(encoder, TEXTS + TEXTS[:1], tmp_path, "train")
    assert texts == sorted(TEXTS[:3])                                  # distinct, blank dropped
    assert torch.allclose(vectors, encoder.embed(texts), atol=1e-5)
    folder = tmp_path / "cache" / description_vectors.FOLDER
    first = list(folder.glob("train-*.safetensors"))
    assert len(first) == 1
    runs = encoder.runs[0]
    again_texts, again = kept_vectors(encoder, reversed(TEXTS), tmp_path, "train")
    assert encoder.runs[0] == runs and again_texts == texts and torch.equal(again, vectors)
    kept_vectors(encoder, TEXTS[:2], tmp_path, "train")                # other texts: computed, and they supersede
    assert encoder.runs[0] == runs + 1
    now = list(folder.glob("train-*.safetensors"))
    assert len(now) == 1 and now != first


def test_pinned_descriptions_are_answered_without_the_model_or_the_lru_cache(encoder, tmp_path):
    texts = [f"a voice number {i}, calm and low" for i in range(5)]
    expected = encoder.embed(texts)
    kept_vectors(encoder, texts, tmp_path, "val")
    runs, cached = encoder.runs[0], encoder.cache_size()
    with descriptions_pinned(encoder, texts, tmp_path, "val"):
        got = encoder.encode(texts[::-1])
        assert encoder.runs[0] == runs and encoder.cache_size() == cached
        assert torch.allclose(got, expected.flip(0), atol=1e-5)
        encoder.remember(texts)                                          # a lent sentence needs nothing
        assert encoder.runs[0] == runs and encoder.cache_size() == cached
        mixed = encoder.encode([texts[0], "a sentence nobody pinned"])   # the rest still runs the model
        assert encoder.runs[0] == runs + 1 and torch.allclose(mixed[0], expected[0], atol=1e-5)
    encoder.encode(texts[1:2])                                           # lent only within
    assert encoder.runs[0] == runs + 2


def test_a_pin_that_ends_leaves_the_others_open(encoder):
    """The encoder is shared by the process (the app's tabs): one caller's pin ending does not take another's."""
    first, second = ["a bright, cheerful voice"], ["a tired, husky voice"]
    vectors = encoder.embed(first + second)
    runs = encoder.runs[0]
    with encoder.pinned(first, vectors[:1]):
        with encoder.pinned(second, vectors[1:]):
            encoder.encode(first + second)
        assert encoder.runs[0] == runs
        assert torch.equal(encoder.encode(first)[0], vectors[0])
        assert encoder.runs[0] == runs
    with pytest.raises(ValueError, match="expected"):
        with encoder.pinned(first, vectors):
            pass
