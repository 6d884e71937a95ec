"""Style-encoder training (`ira train --stage style`) and its retrieval evaluation.

Data: the clips of the prepared corpus (DIR/annotations.jsonl, the token cache's train/val split),
audio from DIR/wavs/<id>.wav at 24 kHz, trimmed of silence as in preparation, turned into log-mels
once per corpus (cached in DIR/cache/style-mels/, ira/data/style_mels.py; a corpus that travelled
without its wavs decodes them from its tokens) and kept in memory (float16). A training step takes a
batch of clip indices; for each clip
it picks one of its train-family descriptions and a random crop of at most `style.crop_seconds`,
drawing both from a generator seeded by (training.seed, micro-step), so a resumed run makes the
same choices as an uninterrupted one.

Validation is retrieval on the val clips with HELD-OUT wordings (`describe(..., family="heldout")`,
a vocabulary never seen in training): for each clip one held-out description ranks all val clips.
Reported: top-1 / top-5 (the very clip), their chance levels 1/N and 5/N, and, because several
clips fit one description, `desc_match` (the top clip has every level the description names)
and `attr_match` (the top clip has the query clip's pitch, rate, gender and accent levels), each
with its chance level (the share of clips that would count as a hit, averaged over queries).

The engine checkpoints at every epoch end, and a pass over a small corpus is only a few
contrastive batches; so an epoch here repeats the corpus until it is at least `training.save_every`
optimizer steps long (or the whole run, if shorter; one pass for a large corpus).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ira.config import IRAConfig
from ira.data.descriptions import attribute_levels, describe, parse_description_hints
from ira.data.style_mels import MelSettings, split_mels, wav_mel
from ira.data.token_cache import load_split
from ira.models.style import (FRAME_RATE, StyleEncoder, contrastive_loss, description_targets,
                              pad_mels)
from ira.training.description_vectors import descriptions_pinned
from ira.training.task import TrainingTask

if TYPE_CHECKING:
    from ira.training.engine import FitResult

log = logging.getLogger(__name__)
MATCH_ATTRIBUTES = ("pitch", "rate", "gender", "accent")
"""What `attr_match` compares between the query clip and the retrieved one."""
EVAL_BATCH = 64
STYLE_EVAL_FIGURES = ("top1", "top5", "chance_top1", "chance_top5", "desc_match", "desc_match_chance", "n_clips",
                      "n_queries")
"""The retrieval figures a checkpoint's `style_eval` header keeps (with the step they were measured at)."""


@dataclass
class StyleClip:
    """One clip as the style stage uses it."""

    id: str
    mel: torch.Tensor                                   # float16 [n_mels, T], at most max_audio_seconds
    levels: dict[str, str]                              # attribute_levels of its annotation
    descriptions: list[str]                             # train-family wordings (from preparation)
    mentioned: list[dict[str, str]] = field(default_factory=list)   # levels each description names
    queries: list[str] = field(default_factory=list)    # evaluation wordings (see load_style_clips)
    queries_mentioned: list[dict[str, str]] = field(default_factory=list)


def mentioned_levels(description: str, levels: dict[str, str]) -> dict[str, str]:
    """The levels a description names, read back from its words; a reading that contradicts the
    clip's own levels (a parser slip) is left out, so a target never excludes the clip itself."""
    return {a: lv for a, lv in parse_description_hints(description).items() if levels.get(a) == lv}


def _read_annotations(data_dir: Path) -> tuple[dict[str, dict], dict]:
    ann_path, stats_path = data_dir / "annotations.jsonl", data_dir / "annotation_stats.json"
    for path in (ann_path, stats_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `ira data prepare --dir {data_dir}` first")
    annotations = {}
    for n, line in enumerate(ann_path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                ann = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{ann_path}:{n}: not valid JSON ({exc}); re-run `ira data prepare "
                                 f"--dir {data_dir}`") from exc
            annotations[ann["id"]] = ann
    return annotations, json.loads(stats_path.read_text(encoding="utf-8"))


def split_mels_of(cfg: IRAConfig, split: str) -> dict[str, torch.Tensor]:
    """The style log-mel of every clip of a token-cache split (preparing the corpus first if needed), from the
    corpus's cache of them (`ira.data.style_mels.split_mels`)."""
    from ira.data.prepare import ensure_prepared

    prepared = ensure_prepared(cfg)
    tokens = load_split(prepared.cache_files[split], prepared.codec.fingerprint)
    return split_mels(cfg.data.dir, split, tokens, prepared.codec,
                      MelSettings.of(cfg.style, cfg.data.trim_silence_db)).mels


def load_style_clips(cfg: IRAConfig, split: str, query_family: str = "heldout", n_queries: int = 1,
                     ids: Optional[Sequence[str]] = None) -> list[StyleClip]:
    """Clips of `split` ("train" / "val") with log-mels, levels, descriptions and query wordings.

    The queries are `n_queries` fresh descriptions of `query_family` ("heldout" / "train"), seeded
    by the clip id (the same every time; a clip with little to say may get fewer).
    Clips without any description are skipped (nothing to learn from them), with a log line.
    """
    data_dir = Path(cfg.data.dir)
    annotations, stats = _read_annotations(data_dir)
    mels: Optional[dict[str, torch.Tensor]] = None
    if ids is None:   # a whole split: its mels are cached, keyed by the token cache's hash of the corpus
        mels = split_mels_of(cfg, split)
        ids = list(mels)
    clips, skipped = [], []
    described: dict[str, list[str]] = {}   # clip id -> its non-empty descriptions
    for clip_id in ids:
        ann = annotations.get(clip_id)
        if ann is None:
            raise KeyError(f"clip {clip_id} is in the {split} token cache but not in "
                           f"{data_dir / 'annotations.jsonl'}; re-run `ira data prepare --dir {data_dir}`")
        descriptions = [d for d in ann.get("descriptions") or [] if d.strip()]
        if descriptions:
            described[clip_id] = descriptions
        else:
            skipped.append(clip_id)
    if mels is None:
        settings = MelSettings.of(cfg.style, cfg.data.trim_silence_db)
        mels = {clip_id: wav_mel(data_dir, clip_id, settings) for clip_id in described}

    for clip_id, descriptions in described.items():
        ann, mel = annotations[clip_id], mels[clip_id]
        levels = attribute_levels(ann, stats)
        queries = describe(ann, stats, random.Random(f"ira-style-query:{query_family}:{clip_id}"),
                           n=n_queries, family=query_family) or descriptions[:1]
        clips.append(StyleClip(
            id=clip_id, mel=mel, levels=levels, descriptions=descriptions,
            mentioned=[mentioned_levels(d, levels) for d in descriptions],
            queries=queries, queries_mentioned=[mentioned_levels(q, levels) for q in queries]))
    if skipped:
        log.warning("style: %d %s clip(s) have no description and are skipped (e.g. %s)",
                    len(skipped), split, skipped[0])
    return clips


def mel_stats(clips: Sequence[StyleClip]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and standard deviation over every frame of `clips`."""
    total = sum(c.mel.shape[1] for c in clips)
    if total == 0:
        raise ValueError("no log-mel frames to compute statistics from (no clips?)")
    s = sum(c.mel.double().sum(dim=1) for c in clips)
    s2 = sum(c.mel.double().pow(2).sum(dim=1) for c in clips)
    mean = s / total
    std = (s2 / total - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float()


# ------------------------------------------------------------------------------ retrieval

@torch.no_grad()
def embed_clips(model: StyleEncoder, clips: Sequence[StyleClip]) -> torch.Tensor:
    """Audio-tower embeddings [N, D] of whole clips (up to style.max_audio_seconds)."""
    out = []
    for start in range(0, len(clips), EVAL_BATCH):
        mels, lengths = pad_mels([c.mel.float() for c in clips[start:start + EVAL_BATCH]])
        out.append(model.audio_features(mels.to(model.device), lengths.to(model.device)))
    return torch.cat(out)


@torch.no_grad()
def evaluate_retrieval(model: StyleEncoder, clips: Sequence[StyleClip],
                       soft_targets: bool = True) -> dict[str, float]:
    """Rank all `clips` for each query wording of each clip; see the module docstring.

    Every query counts once in top1 / top5 / desc_match / attr_match / acc_<attribute>;
    `loss` is the contrastive loss of the first query of each clip against all clips.
    """
    n = len(clips)
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 clips, got {n}")
    owner = torch.tensor([i for i, c in enumerate(clips) for _ in c.queries])
    if len(owner) == 0:
        raise ValueError("the clips have no query wordings (StyleClip.queries is empty)")
    was_training = model.training
    model.eval()
    try:
        audio = embed_clips(model, clips)
        text = model.embed_text([q for c in clips for q in c.queries])
    finally:
        model.train(was_training)
    levels = [c.levels for c in clips]
    first = torch.tensor([int((owner == i).nonzero()[0]) for i in range(n)])
    square = description_targets([clips[i].queries_mentioned[0] for i in range(n)], levels)
    loss = contrastive_loss(text[first], audio, model.logit_scale(), square if soft_targets else None)

    sims = (text @ audio.T).float().cpu()                       # [queries, clips]
    rows = torch.arange(len(owner))
    # Rank of the true clip: how many clips score strictly higher (ties count in its favour).
    rank = (sims > sims[rows, owner][:, None]).sum(dim=1)
    top = sims.argmax(dim=1)
    fits = description_targets([m for c in clips for m in c.queries_mentioned], levels, owner.tolist())
    vocab: dict[Any, int] = {}
    codes = torch.tensor([[vocab.setdefault(lv.get(k), len(vocab)) for k in MATCH_ATTRIBUTES]
                          for lv in levels])                     # a level unknown for both counts as equal
    equal = codes[owner][:, None, :] == codes[None, :, :]        # [queries, clips, attributes]
    same = equal.all(dim=-1)
    return {
        "loss": float(loss),
        "top1": float((rank < 1).float().mean()),
        "top5": float((rank < 5).float().mean()),
        "chance_top1": 1.0 / n,
        "chance_top5": min(5, n) / n,
        "desc_match": float(fits[rows, top].float().mean()),
        "desc_match_chance": float(fits.float().mean()),
        "attr_match": float(same[rows, top].float().mean()),
        "attr_match_chance": float(same.float().mean()),
        **{f"acc_{k}": float(equal[rows, top, a].float().mean()) for a, k in enumerate(MATCH_ATTRIBUTES)},
        "n_clips": float(n),
        "n_queries": float(len(owner)),
    }


def evaluate_checkpoint(path: str | Path, cfg: Optional[IRAConfig] = None, split: str = "val",
                        family: str = "heldout", n_queries: int = 4,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """Retrieval figures of the style encoder in checkpoint `path` on the clips of `split`.

    `cfg` says where the corpus is (default: the config stored in the checkpoint); `family` picks
    the query wordings: "heldout" (never seen in training) or "train".
    """
    from ira.models.style import load_style_encoder

    model = load_style_encoder(path, device)
    if cfg is None:
        from ira.checkpoint import load_checkpoint

        cfg = load_checkpoint(path).ira_config()
    clips = load_style_clips(cfg, split, query_family=family, n_queries=n_queries)
    return evaluate_retrieval(model, clips, soft_targets=model.cfg.soft_targets)


# ------------------------------------------------------------------------------ the task

class _ClipIndices(Dataset):
    """Index i -> clip i mod n: `repeats` passes over the corpus make one epoch."""

    def __init__(self, n: int, repeats: int):
        self.n, self.repeats = n, repeats

    def __len__(self) -> int:
        return self.n * self.repeats

    def __getitem__(self, i: int) -> int:
        return i % self.n


class StyleTask(TrainingTask):
    """The engine's view of style training: module "style", contrastive steps, retrieval validation."""

    stage = "style"
    best_metric = ("val_top5", "max")
    """What the encoder is for: finding a description's clips among the held-out ones (its loss follows the
    same retrieval, but a user reads "top-5 0.10" where "loss 6.02" says nothing)."""

    def __init__(self, cfg: IRAConfig, train_clips: Optional[list[StyleClip]] = None,
                 val_clips: Optional[list[StyleClip]] = None):
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):     # the same initial weights for the same seed,
            torch.manual_seed(cfg.training.seed)      # without touching the caller's RNG
            self.model = StyleEncoder(cfg.style)
        self.train_clips = train_clips if train_clips is not None else load_style_clips(cfg, "train")
        self.val_clips = val_clips if val_clips is not None else load_style_clips(cfg, "val")
        if len(self.train_clips) < cfg.style.batch_size:
            raise ValueError(f"style training has {len(self.train_clips)} training clips in {cfg.data.dir}, "
                             f"fewer than style.batch_size={cfg.style.batch_size}: lower style.batch_size "
                             f"or use a larger corpus")
        self.model.set_mel_stats(*mel_stats(self.train_clips))
        self.micro_step = 0

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"style": self.model}

    def setup(self, device: torch.device) -> None:
        """Embed every training description once with the frozen tower (the encoder remembers them), unless
        their vectors are lent to it already (`run_style_training`: from the corpus's cache)."""
        encoder = self.model.sentence_encoder
        encoder.to(self.model.device)
        encoder.remember(dict.fromkeys(d for c in self.train_clips for d in c.descriptions))

    def epoch_repeats(self) -> int:
        """Passes over the corpus per epoch: enough for min(save_every, max_steps) optimizer steps."""
        tc, sc = self.cfg.training, self.cfg.style
        wanted_batches = min(tc.save_every, tc.max_steps or tc.save_every) * tc.grad_accum_steps
        return max(1, math.ceil(wanted_batches * sc.batch_size / len(self.train_clips)))

    def train_dataloader(self) -> DataLoader:
        data = _ClipIndices(len(self.train_clips), self.epoch_repeats())
        return DataLoader(data, batch_size=self.cfg.style.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> Optional[DataLoader]:
        if len(self.val_clips) < 2:
            return None
        return DataLoader(range(len(self.val_clips)), batch_size=len(self.val_clips))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.training.seed * 1_000_003 + self.micro_step)

    def _crop(self, mel: torch.Tensor, u: float) -> torch.Tensor:
        frames = int(self.cfg.style.crop_seconds * FRAME_RATE)
        if mel.shape[1] <= frames:
            return mel.float()
        start = min(int(u * (mel.shape[1] - frames + 1)), mel.shape[1] - frames)
        return mel[:, start:start + frames].float()

    def training_step(self, batch: torch.Tensor) -> dict[str, Any]:
        g = self._generator()
        self.micro_step += 1
        clips = [self.train_clips[i] for i in batch.tolist()]
        u = torch.rand(len(clips), 2, generator=g).tolist()
        picks = [min(int(a * len(c.descriptions)), len(c.descriptions) - 1) for (a, _), c in zip(u, clips)]
        mels, lengths = pad_mels([self._crop(c.mel, b) for (_, b), c in zip(u, clips)])
        device = self.model.device
        targets = None
        if self.cfg.style.soft_targets:
            targets = description_targets([c.mentioned[k] for c, k in zip(clips, picks)],
                                          [c.levels for c in clips]).to(device)
        sentence = self.model.sentence_embeddings([c.descriptions[k] for c, k in zip(clips, picks)])
        out = self.model(sentence, mels.to(device), lengths.to(device), targets)
        out["samples"] = len(clips)
        out["frames"] = int(lengths.sum())
        return out

    def validate(self, loader: Any) -> dict[str, float]:
        indices = [i for batch in loader for i in torch.as_tensor(batch).tolist()]
        clips = [self.val_clips[i] for i in indices]
        metrics = evaluate_retrieval(self.model, clips, soft_targets=self.cfg.style.soft_targets)
        # what the checkpoint's header (and every later stage's) says about this encoder: ira/eval/quality.py
        self.model.measured = {**{k: metrics[k] for k in STYLE_EVAL_FIGURES},
                               "step": self.micro_step // max(1, self.cfg.training.grad_accum_steps)}
        return {f"val_{k}": v for k, v in metrics.items()}

    def checkpoint_metadata(self) -> dict[str, str]:
        return self.model.metadata()

    def state_dict(self) -> dict[str, Any]:
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state.get("micro_step", 0))


def style_run_config(cfg: IRAConfig) -> IRAConfig:
    """`cfg` with the style run's own batch size, learning rate, step budget and warm-up in `training`."""
    return cfg.with_training_from("style")


def run_style_training(cfg: IRAConfig, resume_from: Optional[str | Path] = None, *,
                       cpu: bool = False, task: Optional[StyleTask] = None) -> FitResult:
    """Train the style encoder; checkpoints `<output_dir>/stagestyle_*.safetensors` (module "style").

    `cpu=True` forces the CPU; `task` reuses an already built StyleTask (its clips are loaded; their
    descriptions may be a subset of the corpus's, so their vectors are not kept in the corpus's cache).
    """
    from ira.data.prepare import ensure_prepared
    from ira.training.engine import Trainer, process_device  # lazy: accelerate is a heavy import

    run_cfg = style_run_config(cfg)
    if task is not None:
        return Trainer(run_cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from)
    ensure_prepared(cfg)   # annotations and descriptions come from preparation
    task = StyleTask(run_cfg)
    task.model.sentence_encoder.to(process_device(cpu))   # the descriptions are embedded where training runs
    descriptions = (d for clip in task.train_clips for d in clip.descriptions)
    with descriptions_pinned(task.model.sentence_encoder, descriptions, run_cfg.data.dir, "train"):
        return Trainer(run_cfg, task, run_name=None, cpu=cpu).fit(resume_from=resume_from)
