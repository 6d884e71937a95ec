"""The `ira` command: `ira info`, `ira data ...` (and the training / inference commands)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm import tqdm

from ira.config import ConfigError, IRAConfig, load_config

log = logging.getLogger("ira")


@contextmanager
def tqdm_progress(description: str) -> Iterator[Callable[[float, str], None]]:
    """A `progress(fraction, message)` callback drawn as a tqdm bar on stderr."""
    bar = tqdm(total=1000, desc=description, unit="‰", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
               file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def progress(fraction: float, message: str) -> None:
        bar.set_postfix_str(message[:60], refresh=False)
        bar.update(int(1000 * max(0.0, min(1.0, fraction))) - bar.n)  # update() honours mininterval

    try:
        yield progress
    finally:
        bar.close()


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config file, or a preset name: cpu, laptop, a100 (default: detected preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set training.batch_size=4 (repeatable)")


def config_from_args(args: argparse.Namespace) -> IRAConfig:
    """The config named by --config (or the detected preset), with every --set applied."""
    source = args.config
    if source is None:
        from ira.hardware import detect_hardware
        source = detect_hardware().preset
    return load_config(source, args.overrides)


# --- ira info -------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from ira.hardware import detect_hardware
    info = detect_hardware()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    rows = [("device", info.device), ("device name", info.device_name),
            ("system memory", f"{info.system_memory_gb:.1f} GB"),
            ("accelerator memory", f"{info.accelerator_memory_gb:.1f} GB" if info.accelerator_memory_gb else "-"),
            ("bf16", "yes" if info.bf16 else "no"), ("fp16", "yes" if info.fp16 else "no"),
            ("4-bit (bitsandbytes)", f"{'yes' if info.four_bit else 'no'} ({info.four_bit_reason})"),
            ("CPU threads", str(info.cpu_count)), ("preset", info.preset)]
    for key, value in rows:
        print(f"{key:>22}: {value}")
    return 0


# --- ira data ... ---------------------------------------------------------------------------------

def _prepare_after(args: argparse.Namespace, corpus_dir: Path) -> None:
    if getattr(args, "no_prepare", False):
        return
    cfg = config_from_args(args).with_overrides([f"data.dir={corpus_dir}"])
    from ira.data.prepare import prepare_corpus
    with tqdm_progress("prepare") as progress:
        result = prepare_corpus(cfg, corpus_dir, progress=progress)
    print(result.summary())


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ira.data.synth import synthesize_corpus
    cfg = config_from_args(args)
    out = Path(args.out or cfg.data.dir)
    num = args.num or cfg.data.synth_num_utterances
    with tqdm_progress("synthesise") as progress:
        seed = cfg.data.synth_seed if args.seed is None else args.seed
        summary = synthesize_corpus(out, num_utterances=num, seed=seed, progress=progress)
    print(json.dumps(summary, indent=2, default=str))
    _prepare_after(args, out)
    return 0


def cmd_data_ljspeech(args: argparse.Namespace) -> int:
    from ira.data.ljspeech import download_ljspeech
    kwargs = {"url": args.url} if args.url else {}
    with tqdm_progress("LJSpeech") as progress:
        corpus = download_ljspeech(Path(args.root), progress=progress, **kwargs)
    print(f"LJSpeech ready in {corpus}")
    _prepare_after(args, corpus)
    return 0


def cmd_data_folder(args: argparse.Namespace) -> int:
    from ira.data.folder import import_folder
    with tqdm_progress("import") as progress:
        corpus = import_folder(Path(args.src), Path(args.out) if args.out else None, progress=progress)
    print(f"corpus ready in {corpus}")
    _prepare_after(args, Path(corpus))
    return 0


def cmd_data_dummy(args: argparse.Namespace) -> int:
    from ira.data.dummy import create_dummy_corpus
    out = Path(args.out)
    create_dummy_corpus(out, num_clips=args.num, seed=args.seed, engine=args.engine)
    print(f"dummy corpus of {args.num} clips in {out}")
    _prepare_after(args, out)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from ira.data.prepare import prepare_corpus
    cfg = config_from_args(args)
    data_dir = Path(args.dir or cfg.data.dir)
    with tqdm_progress("prepare") as progress:
        result = prepare_corpus(cfg, data_dir, progress=progress, force=args.force)
    print(result.summary())
    for row in result.dropped[:20]:
        print(f"  dropped {row['id']}: {row['reason']}")
    if len(result.dropped) > 20:
        print(f"  ... and {len(result.dropped) - 20} more in {data_dir / 'prepare_report.json'}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from ira.data.pack import pack_corpus
    cfg = config_from_args(args)
    data_dir = Path(args.dir or cfg.data.dir)
    result = pack_corpus(cfg.with_overrides([f"data.dir={data_dir}"]), data_dir, Path(args.out),
                         style_mels=args.style_mels, budget=int(args.budget_mib * 2**20))
    print(result.summary())
    return 0


# --- ira train ------------------------------------------------------------------------------------

# stage -> "module:function(cfg, resume_from=...) -> FitResult"
TRAIN_STAGES = {
    "style": "ira.training.stage_style:run_style_training",
    "1": "ira.training.stage1:run_stage1",
    "2": "ira.training.stage2:run_stage2",
    "3": "ira.training.stage3:run_stage3",
}


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
"""`ira` exit codes: finished; failed (NaN, out of memory, an unreadable file...); a bad config key or
argument; a training stopped before its end (STOP file, Ctrl-C, SIGTERM: resume it with
--resume_checkpoint <output_dir>/stage<N>_latest.safetensors)."""


def run_training(stage: str, cfg: IRAConfig, resume_from: str | None = None, in_recipe: bool = False) -> int:
    """Run one stage; exit code EXIT_OK when it finished (steps, epochs or time budget), EXIT_STOPPED when
    it was stopped before that, EXIT_FAILED on NaN / out of memory. A stopped stage says how to continue
    it, unless it runs `in_recipe` (the recipe says that: the same recipe command again)."""
    import importlib

    check_run_folder_first(stage, cfg, resume_from)
    module_name, function_name = TRAIN_STAGES[stage].split(":")
    run = getattr(importlib.import_module(module_name), function_name)
    result = run(cfg, resume_from=resume_from)
    print(result.message)
    if result.status == "stopped" and result.last_checkpoint and not in_recipe:
        print(f"Continue with --resume_checkpoint {result.last_checkpoint}")
    if result.last_checkpoint:
        print(f"checkpoint: {result.last_checkpoint}")
    print(f"metrics: {result.metrics_path}")
    return {"done": EXIT_OK, "stopped": EXIT_STOPPED}.get(result.status, EXIT_FAILED)


def check_run_folder_first(stage: str, cfg: IRAConfig, resume_from: str | None) -> None:
    """Refuse at once what the trainer would refuse only after loading the data and the models (minutes for
    stage 2): training.output_dir naming a file, a folder another run holds, a fresh run over an earlier run's
    checkpoints (ira/training/run_folder.py). The trainer checks again under its lock."""
    from ira.checkpoint import CheckpointError, read_metadata
    from ira.training.run_folder import check_fresh_run, check_not_held, check_output_dir

    folder = check_output_dir(cfg.training.output_dir)
    if os.environ.get("WORLD_SIZE", "1") == "1":   # under torchrun, rank 0 may hold it already: the trainer decides
        check_not_held(folder)
    try:   # a checkpoint of this stage continues its run; one of another stage starts this one afresh
        continues = resume_from is not None and read_metadata(resume_from).get("stage") == str(stage)
    except CheckpointError:
        return   # the stage reports the bad checkpoint itself
    check_fresh_run(folder, stage, resume_from if continues else None)


def cmd_train(args: argparse.Namespace) -> int:
    if (args.stage is None) == (args.recipe is None):
        print("ira train: give either --stage (one stage) or --recipe full --minutes M (every stage in order)",
              file=sys.stderr)
        return EXIT_USAGE
    cfg = config_from_args(args)
    if args.recipe is not None:
        return run_recipe_command(cfg, args.recipe, args.minutes, args.resume_checkpoint)
    return run_training(args.stage, cfg, args.resume_checkpoint)


def run_recipe_command(cfg: IRAConfig, recipe: str, minutes: float | None, resume_checkpoint: str | None) -> int:
    from ira.training.recipe import (SPEAKING, RecipeError, ensure_corpus, has_corpus, prepare_for_recipe,
                                     run_recipe)

    if minutes is None:
        print("ira train --recipe: give its wall-clock budget with --minutes M", file=sys.stderr)
        return EXIT_USAGE
    if resume_checkpoint is not None:
        print("ira train --recipe: --resume_checkpoint is for one stage; run the same recipe command again "
              "to continue a stopped recipe", file=sys.stderr)
        return EXIT_USAGE

    def one_stage(stage: str, stage_cfg: IRAConfig, resume_from: str | None) -> str:
        code = run_training(stage, stage_cfg, resume_from, in_recipe=True)
        return {EXIT_OK: "done", EXIT_STOPPED: "stopped"}.get(code, "failed")

    try:
        if not has_corpus(cfg):
            with tqdm_progress(SPEAKING) as progress:
                ensure_corpus(cfg, progress=progress)
        cfg = prepare_for_recipe(cfg, progress_bar=tqdm_progress)
        outcome = run_recipe(cfg, recipe, minutes, one_stage)
    except RecipeError as e:
        print(f"ira train --recipe: {e}", file=sys.stderr)
        return EXIT_FAILED
    return {"done": EXIT_OK, "stopped": EXIT_STOPPED}.get(outcome, EXIT_FAILED)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, choices=("full",),
                        help="full: the voice style encoder, stage 1, stage 2 and stage 3 in order, each from the "
                             "previous one's best checkpoint, in folders under training.output_dir (run the same "
                             "command again to continue a stopped recipe)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="the recipe's wall-clock budget, split across its stages")
    parser.add_argument("--stage", default=None, choices=sorted(TRAIN_STAGES),
                        help="style: the CLIP-style voice encoder; 1: SpeechLM pre-training "
                             "(start it from a style checkpoint with --resume_checkpoint to follow descriptions); "
                             "2: adapter alignment with the LLM (--resume_checkpoint <stage 1 checkpoint>); "
                             "3: PPO with the LLM as judge (--resume_checkpoint <stage 2 checkpoint>)")
    parser.add_argument("--resume_checkpoint", "--resume-checkpoint", dest="resume_checkpoint", default=None,
                        help="a checkpoint of the same stage continues exactly (with its .train_state.pt); "
                             "one of the previous stage starts this stage from it")
    add_config_args(parser)


# --- ira generate ---------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from ira.audio import check_output_file
    from ira.inference import IRAPipeline
    from ira.speaker import SamplingSettings, Speaker

    check_output_file(args.output)
    pipeline = IRAPipeline(Speaker.from_checkpoint(args.checkpoint, device=args.device, int8=args.int8))
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                cfg_scale=args.cfg_scale, max_seconds=args.max_seconds, seed=args.seed)
    result = pipeline.speak(args.text, style=args.style, reference_audio=args.reference, settings=settings)
    if result.codes.shape[1] == 0:
        print("error: the model ended the speech at once (no frames); train longer or use another seed",
              file=sys.stderr)
        return 1
    path = pipeline.save_audio(result.waveform, args.output, result.sample_rate)
    print(f"{path}: {result.seconds:.2f} s of audio ({result.codes.shape[1]} frames) in "
          f"{result.timings['generate_s'] + result.timings['decode_s']:.2f} s")
    return 0


def add_heldout_args(parser: argparse.ArgumentParser, checkpoint_help: str, minimum: int = 1) -> None:
    """--checkpoint, --sentences and --limit of the `ira eval` commands."""
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--sentences", default=None, metavar="SET_OR_FILE",
                        help="a bundled held-out set, everyday (the default) or hard (rarer words), or a file of "
                             "sentences, one a line")
    at_least = f" (at least {minimum})" if minimum > 1 else ""
    parser.add_argument("--limit", type=int, default=None, help=f"only the first N sentences{at_least}")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    from ira.speaker import SamplingSettings
    d = SamplingSettings()
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-k", dest="top_k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", dest="top_p", type=float, default=d.top_p, help="1 = off")
    parser.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=d.cfg_scale,
                        help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--max-seconds", dest="max_seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


# --- ira understand -------------------------------------------------------------------------------

def cmd_understand(args: argparse.Namespace) -> int:
    from ira.listener import Listener

    # IRAPipeline.understand is this same Listener.understand; the pipeline's speaking half is not needed here.
    listener = Listener.from_checkpoint(args.checkpoint, device=args.device)
    answer = listener.understand(args.audio, args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"{args.audio} | {args.prompt}")
    print(answer.replace("\n", " ").strip() or "(the LLM gave no answer)")
    return 0


# --- ira eval -------------------------------------------------------------------------------------

def cmd_eval_speech(args: argparse.Namespace) -> int:
    from ira.eval import asr
    from ira.eval.speech import evaluate_speech_by, heldout_sentences, record_figures, sentence_set
    from ira.speaker import SamplingSettings, Speaker

    names = [name.strip() for name in args.asr.split(",") if name.strip()] if args.asr else \
        [name for name in asr.NAMES if asr.is_available(name)]
    if not names:
        raise asr.ASRUnavailable(f"no offline ASR is installed here; {asr.INSTALL_HINT}")
    transcribers = {name: asr.transcriber(name) for name in names}   # each loads (and base joins) or says why not
    speaker = Speaker.from_checkpoint(args.checkpoint, device=args.device, int8=args.int8)
    sentences = heldout_sentences(args.sentences, limit=args.limit)
    bundled = sentence_set(args.sentences)       # None: a file of the user's own
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                cfg_scale=args.cfg_scale, max_seconds=args.max_seconds)
    results = evaluate_speech_by(speaker, sentences, transcribers, settings, seed=args.seed,
                                 style=args.style, ceiling=not args.no_ceiling)
    print(f"{args.checkpoint}")
    print(f"sentences: the bundled {bundled} held-out set" if bundled else f"sentences: {args.sentences}")
    for name, result in results.items():
        if args.verbose_items:
            for item, errors in zip(result.model.items, result.errors().sentences):
                print(f"  WER {item.wer:4.2f} | {item.text}\n           heard by {name}: {item.heard}")
                if errors.failures:
                    print(f"           {'; '.join(errors.failures)}")
        print(f"heard by Whisper {name}:")
        print(result.summary())
    main_asr = asr.BASE if asr.BASE in results else names[0]    # the figure to trust: the larger ASR's
    if bundled:   # bundled held-out sentences, in no corpus: the app may call them new (each set its own record)
        record_speech(args.checkpoint, record_figures(results[main_asr], main_asr, args.seed, args.style, bundled))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "settings": vars(settings),
                                               "sentence_set": bundled or str(args.sentences),
                                               "asr": main_asr, **results[main_asr].to_dict(),
                                               "by_asr": {name: r.to_dict() for name, r in results.items()}},
                                              indent=2))
    return 0


def record_speech(checkpoint: str | Path, figures: dict[str, Any]) -> None:
    """Record `ira eval speech`'s figures beside the checkpoint, where the app's Generate tab reads them
    (`ira.eval.quality`); a folder that cannot be written is a warning, not a failure of the evaluation."""
    from ira.checkpoint import read_metadata
    from ira.eval.quality import EVERYDAY_SET, write_speech_record

    try:
        path = write_speech_record(checkpoint, read_metadata(checkpoint), figures)
    except OSError as exc:
        print(f"warning: the figures were not recorded beside the checkpoint ({exc})", file=sys.stderr)
        return
    shown = " (the app's Generate tab shows them)" if figures.get("sentence_set") in (None, EVERYDAY_SET) else ""
    print(f"recorded beside the checkpoint{shown}: {path}")


def cmd_eval_understanding(args: argparse.Namespace) -> int:
    from ira.eval.speech import heldout_sentences
    from ira.eval.understanding import evaluate_understanding
    from ira.listener import Listener

    listener = Listener.from_checkpoint(args.checkpoint, device=args.device)
    sentences = heldout_sentences(args.sentences, limit=args.limit)
    result = evaluate_understanding(listener, sentences)
    if args.verbose_items:
        for row in result.rows:
            mark = "right" if row["chosen"] else "WRONG"
            print(f"  {mark} margin {row['margin']:+.2f} CER {row['cer']:4.2f} | {row['transcript']}\n"
                  f"{'':>34}LLM: {row['reply']}")
    print(f"{args.checkpoint}")
    print(result.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), **result.to_dict()}, indent=2))
    return 0


def cmd_eval_card(args: argparse.Namespace) -> int:
    from ira.eval.card import make_card, read_card, summary

    path = make_card(args.checkpoint, args.out, device=args.device)
    print(path)
    print(summary(read_card(path)))
    return 0


# --- ira bench ------------------------------------------------------------------------------------

def cmd_bench_generate(args: argparse.Namespace) -> int:
    from ira.bench import bench_generate, print_and_save
    presets = [p.strip() for p in args.sizes.split(",") if p.strip()]
    print_and_save(bench_generate(presets, frames=args.frames, repeats=args.repeats), args.json)
    return 0


def cmd_bench_training(args: argparse.Namespace) -> int:
    from ira.bench import bench_training_variants, print_and_save
    variants = [[item.strip() for item in v.split(",") if item.strip()] for v in args.variant]
    print_and_save(bench_training_variants(args.size, variants, batch=args.batch, frames=args.frames,
                                           rounds=args.rounds, gen_frames=args.gen_frames), args.json)
    return 0


def add_bench_all_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="cpu,laptop", help="comma-separated presets whose model sizes to time")
    parser.add_argument("--frames", type=int, default=150, help="frames per generation run (75 = one second)")
    parser.add_argument("--llm", default="bundled", help="the LLM of the end-to-end figures")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")


def cmd_bench_all(args: argparse.Namespace) -> int:
    from ira.bench import bench_all, print_and_save
    from ira.config import LLMConfig
    from ira.models.llm import load_llm

    presets = [p.strip() for p in args.sizes.split(",") if p.strip()]
    llm = load_llm(LLMConfig(name=args.llm), device="cpu")
    print_and_save(bench_all(presets, llm, frames=args.frames), args.json)
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from ira.bench import bench_checkpoint, bench_pipeline, print_and_save
    from ira.config import LLMConfig
    from ira.models.llm import load_llm

    if args.checkpoint:
        print_and_save(bench_checkpoint(args.checkpoint, max_new_tokens=args.max_new_tokens), args.json)
        return 0
    llm = load_llm(LLMConfig(name=args.llm), device="cpu")
    presets = [p.strip() for p in args.sizes.split(",") if p.strip()]
    print_and_save(bench_pipeline(presets, llm, seconds=args.seconds, max_new_tokens=args.max_new_tokens), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ira", description="IRA: Integrated Reasoning with Audio")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="detected hardware and the preset it picks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="build and prepare corpora").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="synthetic multi-voice corpus spoken by eSpeak NG (offline)")
    p.add_argument("--out", default=None, help="corpus folder (default: data.dir)")
    p.add_argument("--num", type=int, default=None, help="number of utterances (default: data.synth_num_utterances)")
    p.add_argument("--seed", type=int, default=None, help="default: data.synth_seed")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("ljspeech", help="download LJSpeech-1.1 (2.6 GB; resumable)")
    p.add_argument("--root", default="data", help="folder that will hold LJSpeech-1.1/")
    p.add_argument("--url", default=None, help="mirror URL of LJSpeech-1.1.tar.bz2")
    p.set_defaults(func=cmd_data_ljspeech)
    p = data.add_parser("folder", help="use your own recordings in LJSpeech layout (wavs/ + metadata.csv)")
    p.add_argument("src")
    p.add_argument("--out", default=None, help="copy into this folder (default: use in place)")
    p.set_defaults(func=cmd_data_folder)
    p = data.add_parser("dummy", help="a tiny corpus for smoke tests")
    p.add_argument("--out", default="data/dummy")
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("auto", "espeak", "tones"), default="auto",
                   help="eSpeak NG speech, or harmonic tones when eSpeak cannot load")
    p.set_defaults(func=cmd_data_dummy)
    for name in ("synth", "ljspeech", "folder", "dummy"):
        q = data.choices[name]
        q.add_argument("--no-prepare", action="store_true", help="do not build the token cache afterwards")
        add_config_args(q)
    p = data.add_parser("prepare", help="validate, annotate, fit the codec and cache the tokens")
    p.add_argument("--dir", default=None, help="corpus folder (default: data.dir)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is fresh, and refit the MelCodec "
                   "(a corpus that grew keeps its codec otherwise, so its checkpoints still resume)")
    add_config_args(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("pack", help="copy a prepared corpus without its wavs, for a device machine (64 MiB)")
    p.add_argument("--dir", default=None, help="corpus folder (default: data.dir); prepared first when needed")
    p.add_argument("--out", required=True, help="a new folder, or an archive when it ends in .tgz or .tar.gz")
    p.add_argument("--style-mels", action="store_true", help="also the style stage's log-mels made from the wavs "
                   "(~34 KB a clip; without them the device decodes them from the tokens)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="fail when the copy is larger (default: 64)")
    add_config_args(p)
    p.set_defaults(func=cmd_data_pack)

    p = sub.add_parser("train", help="train one stage (the data cache is built first when needed)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="speak a text with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a stage 1, 2 or 3 checkpoint")
    p.add_argument("--text", required=True)
    p.add_argument("--style", default=None, help='a voice description, e.g. "a slow, deep voice with a British accent"')
    p.add_argument("--reference", default=None, help="a short clip whose voice to imitate (instead of --style)")
    p.add_argument("-o", "--output", default="output.wav")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights for the SpeechLM's linear layers (CPU only): faster, slightly different tokens")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("understand", help="ask the LLM about a speech clip (no transcript is made); "
                                          "the answer is the last line printed")
    p.add_argument("--checkpoint", required=True, help="a stage 2 or 3 checkpoint")
    p.add_argument("--audio", required=True, help="a speech clip (wav, flac, ...)")
    p.add_argument("--prompt", default="What did the speaker say?")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=cmd_understand)

    evaluate = sub.add_parser("eval", help="quality figures of a trained checkpoint").add_subparsers(
        dest="eval_command", required=True)
    p = evaluate.add_parser("speech", help="intelligibility: held-out sentences spoken, heard by an offline ASR "
                                           "(WER / CER), next to the codec's own ceiling")
    add_heldout_args(p, "a stage 1, 2 or 3 checkpoint")
    p.add_argument("--style", default=None, help="a voice description to speak them with (default: none)")
    p.add_argument("--no-ceiling", dest="no_ceiling", action="store_true", help="skip the eSpeak / codec ceiling")
    p.add_argument("--int8", action="store_true", help="int8 weights for the SpeechLM (CPU only)")
    p.add_argument("--show", dest="verbose_items", action="store_true", help="print what the ASR heard")
    p.add_argument("--asr", default=None, metavar="NAMES",
                   help="the ASRs that hear the speech, comma-separated: tiny.en, base (Whisper base, the figure to "
                        "trust) or a faster-whisper model folder (default: tiny.en and base, those installed)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure and transcript to FILE")
    add_sampling_args(p)
    p.set_defaults(func=cmd_eval_speech)
    p = evaluate.add_parser("understanding", help="does the LLM hear? held-out speech through the adapter: "
                                                  "4-way choice accuracy, judge margin, repeat CER, adapter cosine")
    add_heldout_args(p, "a stage 2 or 3 checkpoint", minimum=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--show", dest="verbose_items", action="store_true", help="print every reply")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure and reply to FILE")
    p.set_defaults(func=cmd_eval_understanding)
    p = evaluate.add_parser("card", help="a checkpoint's card: three held-out sentences spoken (wavs), what the offline "
                                          "ASR heard and, for stage 2 and 3, what the LLM answered when asked to "
                                          "repeat them (what the full recipe writes after each stage)")
    p.add_argument("--checkpoint", required=True, help="a stage 1, 2 or 3 checkpoint")
    p.add_argument("--out", default=None, help="the card's folder (default: <checkpoint's folder>/card)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_eval_card)

    bench_parser = sub.add_parser("bench", help="benchmarks that print figures (no subcommand: all of them)")
    add_bench_all_args(bench_parser)
    bench_parser.set_defaults(func=cmd_bench_all)
    bench = bench_parser.add_subparsers(dest="bench_command", required=False)
    p = bench.add_parser("all", help="every figure: generation paths, streaming, batches, training, end to end")
    add_bench_all_args(p)
    p.set_defaults(func=cmd_bench_all)
    p = bench.add_parser("generate", help="real-time factor of generation with and without the KV cache")
    p.add_argument("--sizes", default="cpu,laptop", help="comma-separated presets whose model sizes to time")
    p.add_argument("--frames", type=int, default=150, help="frames per run (75 = one second of audio)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    p.set_defaults(func=cmd_bench_generate)

    p = bench.add_parser("training", help="stage-1 training frames per second and generation's real-time factor "
                                          "of a preset and of variants of it, timed in turns in one run")
    p.add_argument("--size", default="cpu", help="the preset whose model to time")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="config overrides of one variant, e.g. speech_lm.frames_per_step=2 (repeatable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=300, help="frames per training clip (300 = 4 s)")
    p.add_argument("--rounds", type=int, default=3, help="turns; each figure is its best turn")
    p.add_argument("--gen-frames", dest="gen_frames", type=int, default=150, help="frames per generation run")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    p.set_defaults(func=cmd_bench_training)

    p = bench.add_parser("pipeline", help="latency of each end-to-end step (speak, decode, adapter, LLM answer) "
                                          "for a 10-word sentence")
    p.add_argument("--sizes", default="cpu,laptop", help="comma-separated presets whose model sizes to time")
    p.add_argument("--seconds", type=float, default=4.0, help="audio spoken (a 10-word sentence is ~4 s)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    p.add_argument("--llm", default="bundled", help="the LLM that answers (bundled, a hub id or a folder)")
    p.add_argument("--checkpoint", default=None,
                   help="time end_to_end_pipeline on this trained checkpoint instead of random models")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    p.set_defaults(func=cmd_bench_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.func(args))


def run_reporting_errors(command: Callable[[], Optional[int]]) -> int:
    """Run a command the way `ira` runs its own (the scripts/ tools too): a mistake the package explains
    (a bad config key, a missing or wrong checkpoint, unreadable audio) is one `error:` line on stderr and
    its exit code, never a traceback."""
    try:
        return int(command() or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
