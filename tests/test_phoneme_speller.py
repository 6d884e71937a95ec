"""The phoneme speller: word pieces spelled by eSpeak NG, bags summed per piece, a reader that starts as the
LLM's rows, and an adapter round trip that keeps the spellings."""

import json

import pytest
import torch

from ira.config import AdapterConfig
from ira.models.adapter import PerceiverAdapter
from ira.models.phoneme_speller import PhonemeSpeller, spell
from ira.models.vocabulary_reader import VocabularyReader
from ira.text_tokenizer import PhonemeTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pieces_are_spelled_by_espeak_and_unreadable_ones_are_empty():
    tokenizer = PhonemeTokenizer()
    spellings = spell([" umbrella", "ze", ",", "?!", " the"], tokenizer.encode, length=6)
    assert spellings.shape == (5, 6)
    assert spellings[0].tolist() == [i + 1 for i in tokenizer.encode("umbrella")[:6]]   # cut to `length`
    assert (spellings[1] > 0).sum() == len(tokenizer.encode("ze"))
    assert spellings[2].eq(0).all() and spellings[3].eq(0).all()                      # nothing to say
    assert spellings[4, :2].tolist() == [i + 1 for i in tokenizer.encode("the")]


def test_each_piece_sums_its_own_positional_and_plain_phonemes():
    torch.manual_seed(0)
    spellings = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 2]])
    speller = PhonemeSpeller(spellings, n_phonemes=4, out_dim=8, dim=5)
    indices, offsets = speller._bags()
    width = 5
    bags = [indices[offsets[k]: offsets[k + 1] if k + 1 < 3 else len(indices)].tolist() for k in range(3)]
    assert bags[0] == [0 * width + 3, 1 * width + 1, 3 * width + 3, 3 * width + 1]
    assert bags[1] == []
    assert sorted(bags[2]) == sorted([2, width + 2, 2 * width + 2] + [3 * width + 2] * 3)
    assert torch.equal(speller(), torch.zeros(3, 8))          # the last map starts at zero
    with pytest.raises(ValueError, match="beyond"):
        PhonemeSpeller(spellings, n_phonemes=2, out_dim=8)


def test_a_spelled_reader_starts_as_the_rows_learns_through_the_spelling_and_round_trips():
    torch.manual_seed(0)
    table = torch.randn(30, 16)
    spellings = spell(["cat", "cap", "dog", "."], PhonemeTokenizer().encode)
    plain = VocabularyReader.from_llm_table(table, [2, 5, 11, 17], trainable=True)
    speller = PhonemeSpeller(spellings, PhonemeTokenizer().vocab_size, 16, dim=8)
    spelled = VocabularyReader.from_llm_table(table, [2, 5, 11, 17], trainable=True, speller=speller)
    spelled.load_state_dict({**plain.state_dict(), **spelled.state_dict(),
                             "blank": plain.blank, "log_scale": plain.log_scale}, strict=False)
    soft = torch.randn(2, 6, 16)
    assert torch.allclose(spelled.logits(soft), plain.logits(soft))
    loss = spelled.ctc_loss(soft, [[2, 5], [11]])
    loss.backward()
    assert speller.out.weight.grad.abs().sum() > 0            # every piece heard trains the shared spelling
    with pytest.raises(ValueError, match="speller"):
        VocabularyReader.from_llm_table(table, [2, 5, 11], trainable=True, speller=speller)

    adapter = PerceiverAdapter(AdapterConfig(n_latents=8, dim=32, n_layers=1, n_heads=4, max_audio_frames=64,
                                             window=1.0, reach=3.0, output="vocabulary", spelled=True),
                               24, 16, 3.0, spelled)
    with torch.no_grad():
        speller.out.weight.normal_()
    rebuilt = PerceiverAdapter.from_config_dict(json.loads(json.dumps(adapter.config_dict())))
    rebuilt.load_state_dict(adapter.state_dict())
    assert torch.equal(rebuilt.reader.speller.spellings, spellings)
    features, mask = torch.randn(2, 12, 24), torch.ones(2, 12, dtype=torch.bool)
    for a, b in zip(rebuilt.eval()(features, mask), adapter.eval()(features, mask)):
        assert torch.equal(a, b)


def test_the_blank_penalty_keeps_words_the_reader_is_nearly_sure_of_and_travels_with_the_adapter():
    reader = VocabularyReader.from_llm_table(torch.eye(4), [1, 2], trainable=True)
    logits = torch.tensor([[[5.0, 4.0, 0.0], [5.0, 0.0, 1.0], [0.0, 0.0, 3.0]]])   # blank narrowly ahead at 0
    assert reader.best_classes(logits) == [[0, 0, 2]]
    reader.blank_penalty = 2.0
    assert reader.best_classes(logits) == [[1, 0, 2]]      # 5 - 2 < 4: the word is kept; 5 - 2 > 1: not there
    adapter = PerceiverAdapter(AdapterConfig(n_latents=8, dim=32, n_layers=1, n_heads=4, max_audio_frames=64,
                                             output="vocabulary", blank_penalty=1.5), 24, 4, 1.0,
                               VocabularyReader.from_llm_table(torch.eye(4), [1, 2], trainable=True))
    assert adapter.reader.blank_penalty == 1.5
    rebuilt = PerceiverAdapter.from_config_dict(json.loads(json.dumps(adapter.config_dict())))
    assert rebuilt.reader.blank_penalty == 1.5
