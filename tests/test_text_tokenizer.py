"""Text tokenizers: the default character vocabulary and the Hugging Face wrapper."""

import json

import pytest
import torch

from ira.text_tokenizer import (CHAR_VOCAB, CharTokenizer, HFTextTokenizer, PhonemeTokenizer, TextNotReadableError,
                                build_text_tokenizer, text_tokenizer_from_dict, unreadable_characters)


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


# -- phonemes ---------------------------------------------------------------------------------------

def test_phonemes_keep_stress_word_boundaries_and_clause_punctuation():
    tok = build_text_tokenizer("phoneme")
    assert isinstance(tok, PhonemeTokenizer) and tok.voice == "en-us"
    phonemes = tok.phonemize("Hello, world! How are you today?")
    assert phonemes == "həlˈoʊ, wˈɜːld! hˌaʊ ɑːɹ juː tədˈeɪ?"
    assert "ˈ" in phonemes and "ˌ" in phonemes and "ː" in phonemes           # primary, secondary stress; length
    assert tok.decode(tok.encode("Hello, world! How are you today?")) == phonemes
    assert tok.phonemize("I read it; yes: now.").count(";") == 1 and tok.phonemize("Wait... what?!").endswith("!")
    assert tok.pad_id == 0 and 0 not in tok.encode("Hello")


def test_numbers_and_abbreviations_are_read_by_espeak():
    tok = PhonemeTokenizer()
    assert tok.phonemize("47 sheep") == tok.phonemize("forty seven sheep")
    assert tok.phonemize("Dr. Smith").startswith("dˈɑːktɚ")
    year = tok.phonemize("in 1987")   # "nineteen hundred eighty seven", as eSpeak says it
    assert tok.phonemize("nineteen") in year and tok.phonemize("eighty seven") in year


def test_phoneme_tokenizer_round_trips_through_its_dict_and_a_checkpoint(tmp_path):
    from ira.config import IRAConfig, SpeechLMConfig
    from ira.models.speech_lm import SpeechLM
    from ira.training.checkpoint import load_checkpoint, save_checkpoint
    from ira.models.hub import tokenizer_from_checkpoint

    tok = PhonemeTokenizer("en-gb-scotland")
    again = text_tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(again, PhonemeTokenizer) and again.voice == "en-gb-scotland"
    text = "The 3rd train leaves at 7:30, doesn't it?"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    model = SpeechLM(SpeechLMConfig(d_model=32, n_layers=1, n_heads=2), 2, 8, tok.vocab_size)
    path = save_checkpoint(tmp_path / "x.safetensors", {"speech_lm": model}, stage="1", epoch=0, step=0,
                           config=IRAConfig(), metadata={"tokenizer": json.dumps(tok.to_dict())})
    loaded = tokenizer_from_checkpoint(load_checkpoint(path))
    assert loaded.encode(text) == tok.encode(text)


@pytest.mark.parametrize("text, named", [("你好", "'你' (U+4F60)"), ("😀😀", "'😀' (U+1F600)"),
                                         ("hello 😀", "U+1F600"), ("Привет", "U+041F")])
def test_text_the_phonemizer_cannot_read_is_a_clear_error(text, named):
    tok = PhonemeTokenizer()
    with pytest.raises(TextNotReadableError, match="cannot read") as info:
        tok.encode(text)
    assert named in str(info.value)
    with pytest.raises(TextNotReadableError, match="nothing to speak"):
        tok.encode("... --")
    assert unreadable_characters("Café naïve, 5 € & 10% — ok?") == []


def test_an_unknown_espeak_voice_is_named():
    with pytest.raises(Exception, match="no voice 'xx-nowhere'"):
        build_text_tokenizer("phoneme:xx-nowhere")
