"""Searching a corpus by voice description (ira.style_search) with a tiny untrained style encoder."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from ira.audio import load_audio
from ira.codec.mel import SAMPLE_RATE
from ira.config import load_config
from ira.data.corpus import read_metadata
from ira.data.dummy import create_dummy_corpus
from ira.data.prepare import prepare_corpus
from ira.models.style import StyleEncoder
from ira.style_search import (StyleIndex, compare, compute_style_index, index_cache_path, index_key, load_index,
                              nearest, read_descriptions, style_index, style_map)
from ira.training.checkpoint import save_checkpoint

N_CLIPS = 8
TINY = ["codec.name=mel", "codec.mel_n_codebooks=2", "codec.mel_codebook_size=16", "codec.mel_kmeans_iters=2",
        "speech_lm.style_dim=16", "style.embed_dim=16", "style.audio_dim=16", "style.audio_layers=1",
        "style.audio_heads=2", "style.text_hidden=0", "style.dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 dummy clips, prepared (annotations with descriptions) with a tiny codec."""
    root = tmp_path_factory.mktemp("style_search")
    data_dir = create_dummy_corpus(root / "tiny", num_clips=N_CLIPS, seed=0)
    prepare_corpus(load_config("cpu", TINY + [f"data.dir={data_dir}", f"training.output_dir={root / 'unused'}"]))
    return data_dir


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(a randomly initialised tiny style encoder, its checkpoint file)."""
    cfg = load_config("cpu", TINY)
    torch.manual_seed(0)
    model = StyleEncoder(cfg.style).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "stagestyle_latest.safetensors", {"style": model},
                           stage="style", epoch=0, step=0, config=cfg, metadata=model.metadata())
    return model, path


@pytest.fixture(scope="module")
def index(encoder, corpus) -> StyleIndex:
    return compute_style_index(encoder[0], corpus)


def test_index_holds_every_clip_with_its_description_and_audio_embedding(encoder, corpus, index):
    model, _ = encoder
    annotations = [json.loads(line) for line in (corpus / "annotations.jsonl").read_text().splitlines()]
    assert index.ids == [c.id for c in read_metadata(corpus)] and len(index) == N_CLIPS == index.total_clips
    assert index.descriptions == [a["descriptions"][0] for a in annotations]
    assert all(index.descriptions) and index.skipped == [] and not index.from_cache
    assert [p.name for p in index.wav_paths] == [f"{i}.wav" for i in index.ids]
    assert index.embeddings.shape == (N_CLIPS, model.embed_dim)
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(N_CLIPS), atol=1e-5)
    # The same vector as embedding the wav directly (batching pads, padding is masked).
    with torch.no_grad():
        direct = model.embed_audio([load_audio(index.wav_paths[3], SAMPLE_RATE)])[0]
    assert torch.allclose(index.embeddings[3], direct, atol=1e-4)


def test_unreadable_clips_are_skipped_with_the_reason_and_the_cap_applies(encoder, corpus, tmp_path):
    model, _ = encoder
    copy = shutil.copytree(corpus, tmp_path / "broken")
    sf.write(copy / "wavs" / "dummy_0001.wav", np.zeros(24_000, dtype=np.float32), 24_000)
    (copy / "wavs" / "dummy_0002.wav").unlink()
    (copy / "annotations.jsonl").unlink()                     # unprepared: no descriptions
    fractions = []
    found = compute_style_index(model, copy, progress=lambda f, m: fractions.append(f), batch_size=3)
    assert found.ids == [f"dummy_{i:04d}" for i in range(N_CLIPS) if i not in (1, 2)]
    reasons = dict(found.skipped)
    assert "silent" in reasons["dummy_0001"] and "dummy_0001.wav" in reasons["dummy_0001"]
    assert "no such audio file" in reasons["dummy_0002"]
    assert found.descriptions == [""] * len(found) and read_descriptions(copy) == {}
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    capped = compute_style_index(model, copy, max_clips=3)
    assert capped.ids == ["dummy_0000"] and capped.total_clips == N_CLIPS   # 2 of the first 3 unreadable
    with pytest.raises(ValueError, match="max_clips"):
        compute_style_index(model, copy, max_clips=0)


def test_nothing_readable_is_a_clear_error(encoder, corpus, tmp_path):
    copy = shutil.copytree(corpus, tmp_path / "empty")
    shutil.rmtree(copy / "wavs")
    with pytest.raises(ValueError, match="no clip of .* could be embedded"):
        compute_style_index(encoder[0], copy)


def test_nearest_puts_the_clip_whose_embedding_is_the_query_first(index):
    for i, clip_id in enumerate(index.ids):
        found = nearest(index, index.embeddings[i] * 3.0, k=4)       # the query's length does not matter
        assert found[0].clip_id == clip_id and found[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert found[0].description == index.descriptions[i] and found[0].wav_path.endswith(f"{clip_id}.wav")
        sims = [n.similarity for n in found]
        assert sims == sorted(sims, reverse=True) and len(found) == 4
    assert len(nearest(index, index.embeddings[0], k=100)) == N_CLIPS
    with pytest.raises(ValueError, match="k must be"):
        nearest(index, index.embeddings[0], k=0)
    with pytest.raises(ValueError, match="style space has 16"):
        nearest(index, torch.ones(7), k=1)
    with pytest.raises(ValueError, match="zero"):
        nearest(index, torch.zeros(16), k=1)


def test_a_description_ranks_clips_by_cosine_similarity(encoder, index):
    model, _ = encoder
    query = model.embed_description("a slow, deep voice with a British accent")
    found = nearest(index, query, k=N_CLIPS)
    expected = (index.embeddings @ query).tolist()
    assert {n.clip_id: n.similarity for n in found} == pytest.approx(dict(zip(index.ids, expected)), abs=1e-5)


def test_the_index_is_cached_and_a_damaged_or_stale_cache_is_rebuilt(encoder, corpus, tmp_path):
    model, checkpoint = encoder
    data = shutil.copytree(corpus, tmp_path / "cached")
    first = style_index(model, checkpoint, data)
    key = index_key(checkpoint, data)
    path = index_cache_path(data, key)
    assert not first.from_cache and path.is_file()
    second = style_index(model, checkpoint, data)
    assert second.from_cache and torch.equal(second.embeddings, first.embeddings)
    assert (second.ids, second.descriptions) == (first.ids, first.descriptions)

    for damage in (b"not a safetensors file", path.read_bytes()[:100]):      # garbage, a truncated write
        path.write_bytes(damage)
        rebuilt = style_index(model, checkpoint, data)
        assert not rebuilt.from_cache and torch.allclose(rebuilt.embeddings, first.embeddings, atol=1e-6)
        assert style_index(model, checkpoint, data).from_cache               # the file is whole again

    # A changed metadata.csv: a new key, the old file goes.
    stat = (data / "metadata.csv").stat()
    os.utime(data / "metadata.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert index_key(checkpoint, data) != key
    assert not style_index(model, checkpoint, data).from_cache
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == [index_cache_path(data, index_key(checkpoint, data)).name]   # no stale file, no *.tmp
    assert index_key(checkpoint, data, max_clips=3) != index_key(checkpoint, data)
    # A cache of another style dimension is not trusted; use_cache=False neither reads nor writes one.
    fresh = index_cache_path(data, index_key(checkpoint, data))
    assert load_index(fresh, index_key(checkpoint, data), data, dim=32) is None
    assert load_index(fresh, index_key(checkpoint, data), data, dim=16) is not None
    fresh.unlink()
    assert not style_index(model, checkpoint, data, use_cache=False).from_cache and not fresh.exists()


def test_a_later_stage_s_checkpoint_shares_the_index_of_the_style_encoder_it_carries(encoder, corpus, tmp_path):
    """The issue: the first search with a stage-3 checkpoint embedded every clip again (208 s) although its style
    encoder is the style checkpoint's, unchanged. The index is keyed by the encoder's own weights: a checkpoint of
    another stage and save carrying the same encoder reads the cached index; changed weights make a new one."""
    from ira.checkpoint import load_checkpoint, read_metadata
    from ira.style_search import encoder_fingerprint

    model, checkpoint = encoder
    data = shutil.copytree(corpus, tmp_path / "shared")
    built = style_index(model, checkpoint, data)
    assert not built.from_cache
    meta = read_metadata(checkpoint)
    style = load_checkpoint(checkpoint, modules=("style",)).tensors["style"]
    carried = {"style_config": meta["style_config"], "text_encoder": meta["text_encoder"]}
    stage3 = save_checkpoint(tmp_path / "run" / "stage3_best.safetensors",
                             {"style": style, "speech_lm": {"w": torch.ones(3)}}, stage="3", epoch=0, step=5,
                             config=load_config("cpu", TINY), metadata=carried)
    assert read_metadata(stage3)["checkpoint_id"] != meta["checkpoint_id"]
    assert encoder_fingerprint(stage3) == encoder_fingerprint(checkpoint)
    assert index_key(stage3, data) == index_key(checkpoint, data)
    shared = style_index(model, stage3, data)
    assert shared.from_cache and torch.equal(shared.embeddings, built.embeddings)

    trained = {**style, "log_scale": style["log_scale"] + 1.0}   # the encoder trained further: not the same index
    later = save_checkpoint(tmp_path / "run" / "stagestyle_best.safetensors", {"style": trained}, stage="style",
                            epoch=0, step=9, config=load_config("cpu", TINY), metadata=carried)
    assert index_key(later, data) != index_key(checkpoint, data)


def test_style_map_is_a_deterministic_pca(encoder, index):
    model, _ = encoder
    queries = model.embed_text(["a deep voice", "a high voice", "a whisper"])
    a, b = style_map(index, queries), style_map(index, list(queries))
    assert a.clips.shape == (N_CLIPS, 2) and a.queries.shape == (3, 2)
    assert torch.equal(a.clips, b.clips) and torch.equal(a.queries, b.queries)
    assert torch.allclose(a.clips.mean(dim=0), torch.zeros(2), atol=1e-5)     # centred on the corpus
    assert a.explained[0] >= a.explained[1] > 0 and float(a.explained.sum()) <= 1.0 + 1e-6
    assert style_map(index).queries.shape == (0, 2)

    # Known geometry: the clips spread along e1 (a little along e2); the axis sign puts the larger s right.
    s = torch.tensor([-0.6, -0.2, 0.2, 0.6])
    points = F.normalize(torch.stack([torch.ones(4), s, 0.1 * torch.tensor([1.0, -1.0, -1.0, 1.0])], 1), dim=1)
    toy = StyleIndex(corpus_dir=index.corpus_dir, ids=list("abcd"), descriptions=[""] * 4, embeddings=points)
    mapped = style_map(toy, torch.tensor([0.0, 1.0, 0.0]))
    assert mapped.clips[:, 0].argsort().tolist() == [0, 1, 2, 3]
    assert mapped.queries[0, 0] > mapped.clips[3, 0]                   # the query lies furthest along e1
    assert mapped.explained[0] > 0.9
    reordered = style_map(StyleIndex(toy.corpus_dir, toy.ids, toy.descriptions, points[[3, 1, 0, 2]]))
    assert torch.allclose(reordered.clips, mapped.clips[[3, 1, 0, 2]], atol=1e-5)   # the order flips no axis
    # One clip (or identical clips): no axis to show, everything at the origin.
    single = StyleIndex(toy.corpus_dir, ["a"], [""], points[:1])
    assert torch.equal(style_map(single, points[1:2]).clips, torch.zeros(1, 2))
    assert torch.equal(style_map(single).explained, torch.zeros(2))


def test_compare_two_descriptions(encoder):
    model, _ = encoder
    assert compare(model, "a slow, deep voice", "  a slow,   deep voice ") == pytest.approx(1.0, abs=1e-5)
    other = compare(model, "a slow, deep voice", "a fast, squeaky child")
    assert -1.0 <= other < 0.999
    assert compare(model, "a fast, squeaky child", "a slow, deep voice") == pytest.approx(other, abs=1e-6)
    with pytest.raises(ValueError, match="first description is empty"):
        compare(model, "  ", "a voice")
    with pytest.raises(ValueError, match="second description is empty"):
        compare(model, "a voice", "")
