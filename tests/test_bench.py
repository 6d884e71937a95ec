import json

from ira.bench import build_model, codec_shape
from ira.cli import main


def test_codec_shapes_follow_the_presets():
    assert codec_shape("cpu") == (4, 256)
    assert codec_shape("laptop") == (8, 1024)          # EnCodec 6 kbps


def test_bench_generate_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "generate", "--sizes", "cpu", "--frames", "6", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for key in ("cpu.rtf_kv_cache", "cpu.rtf_no_cache", "cpu.rtf_int8_kv_cache", "cpu.gain_kv_cache",
                "cpu.gain_int8", "cpu.params_m", "cpu.time_to_first_audio_s", "cpu.time_to_first_audio_s_int8",
                "cpu.batch1_audio_s_per_s", "cpu.batch16_audio_s_per_s"):
        assert figures[key] > 0, key
    assert 0.0 <= figures["cpu.int8_token_agreement"] <= 1.0


def test_bench_training_times_the_preset_and_each_variant(tmp_path):
    out = tmp_path / "training.json"
    assert main(["bench", "training", "--size", "cpu", "--variant", "speech_lm.frames_per_step=2", "--batch", "2",
                 "--frames", "20", "--rounds", "1", "--gen-frames", "8", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for label in ("preset", "speech_lm.frames_per_step=2"):
        for key in ("train_frames_per_s", "train_step_s", "train_speedup", "generate_rtf"):
            assert figures[f"cpu[{label}].{key}"] > 0, (label, key)
    assert figures["cpu[preset].train_speedup"] == 1.0


def test_cached_and_naive_generation_agree_at_preset_size():
    model, tokenizer = build_model("cpu")
    a = model.generate(texts=["same tokens"], tokenizer=tokenizer, max_frames=10, temperature=0, use_cache=True)[0]
    b = model.generate(texts=["same tokens"], tokenizer=tokenizer, max_frames=10, temperature=0, use_cache=False)[0]
    assert a.shape[1] > 0 and a.equal(b)


def test_bench_pipeline_reports_every_step(bundled_llm):
    from ira.bench import bench_pipeline

    figures = bench_pipeline(["cpu"], bundled_llm, seconds=0.2, max_new_tokens=2)
    for key in ("speak_s", "decode_s", "adapter_s", "llm_s", "total_s", "audio_s", "params_m"):
        assert figures[f"cpu.{key}"] > 0, key
    assert figures["cpu.total_s"] >= figures["cpu.speak_s"] + figures["cpu.llm_s"]
    assert figures["cpu.llm_tokens"] >= 0
