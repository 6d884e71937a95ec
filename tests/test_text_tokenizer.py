"""Text tokenizers: the default character vocabulary and the Hugging Face wrapper."""

import json

import pytest
import torch

from ira.text_tokenizer import (CHAR_VOCAB, CharTokenizer, HFTextTokenizer, build_text_tokenizer,
                                text_tokenizer_from_dict)


def test_char_round_trip_and_normalisation():
    tok = build_text_tokenizer("char")
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(CHAR_VOCAB) + 2 and tok.pad_id == 0
    text = "hello, world! 42 (it's fine)."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("HeLLo") == tok.encode("hello")
    assert tok.decode(tok.encode("  Café\u2014na\u00efve  \u201cquote\u201d\t\nend\u2026 ")) == 'cafe-naive "quote" end...'
    assert 0 not in tok.encode(text)  # pad never appears in an encoding


def test_char_unknown_characters_become_unk_and_never_crash():
    tok = CharTokenizer()
    ids = tok.encode("a\u4e2d\U0001f600b\x00")
    assert ids == [tok.encode("a")[0], tok.unk_id, tok.unk_id, tok.encode("b")[0], tok.unk_id]
    assert tok.decode(ids) == "a\ufffd\ufffdb\ufffd"
    assert tok.encode("") == []
    assert tok.decode([tok.vocab_size + 5]) == "\ufffd"


def test_batch_encode_right_pads_with_a_mask():
    tok = CharTokenizer()
    ids, mask = tok.batch_encode(["abc", "", "de"])
    assert ids.shape == mask.shape == (3, 3) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 0, 2]
    assert (ids[~mask] == tok.pad_id).all()
    assert ids[2, :2].tolist() == tok.encode("de")


def test_char_to_dict_restores_exactly_through_json():
    tok = CharTokenizer("zyx ")
    back = text_tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(back, CharTokenizer) and back.chars == "zyx "
    assert back.encode("x yz!") == tok.encode("x yz!") == [4, 5, 3, 2, 1]
    with pytest.raises(ValueError, match="unknown type"):
        text_tokenizer_from_dict({"type": "bpe"})
    with pytest.raises(ValueError, match="duplicates"):
        CharTokenizer("aa")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A real (tiny, word-level) Hugging Face tokenizer saved to a local folder: no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "hello": 2, "world": 3, "speech": 4}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(folder)
    return str(folder)


def test_hf_wrapper_encodes_and_round_trips_its_metadata(hf_folder):
    tok = build_text_tokenizer(hf_folder)
    assert isinstance(tok, HFTextTokenizer)
    assert tok.vocab_size == 5 and tok.pad_id == 0
    assert tok.encode("hello speech banana") == [2, 4, 1]
    assert tok.decode([2, 3]) == "hello world"
    ids, mask = tok.batch_encode(["hello", "world hello"])
    assert ids.tolist() == [[2, 0], [3, 2]] and mask.tolist() == [[True, False], [True, True]]
    back = text_tokenizer_from_dict(tok.to_dict())
    assert back.encode("world speech") == [3, 4]
    with pytest.raises(ValueError, match="not the same tokenizer"):
        text_tokenizer_from_dict({**tok.to_dict(), "vocab_size": 7})


def test_hf_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="speech_lm.text_tokenizer"):
        HFTextTokenizer(str(tmp_path / "no-such-tokenizer"), local_files_only=True)
    with pytest.raises(ValueError, match="'char'"):
        build_text_tokenizer("  ")
