"""Audio codecs: one interface (`Codec`), EnCodec where its weights are at hand, MelCodec offline.

`build_codec(cfg, data_dir)` is the one way the rest of IRA gets a codec; `resolve_codec_name`
says which one `codec.name: auto` would pick without building it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from ira.codec.base import Codec, CodecError
from ira.codec.encodec_codec import EncodecCodec, find_weights, url_reachable
from ira.codec.mel import MelCodec, log_mel
from ira.config import CodecConfig

log = logging.getLogger(__name__)

__all__ = ["Codec", "CodecError", "EncodecCodec", "MelCodec", "build_codec", "codec_from_tensors",
           "codec_to_tensors", "log_mel", "mel_codec_path", "resolve_codec_name"]


def mel_codec_path(data_dir: str | Path) -> Path:
    """Where `ira data prepare` keeps the MelCodec fitted on a corpus."""
    return Path(data_dir) / "codec" / "mel_codec.safetensors"


def _encodec_unavailable_reason(cfg: CodecConfig) -> str | None:
    """None when EnCodec's weights are on disk or can be downloaded now, else why not."""
    if find_weights(cfg.weights_dir) is not None:
        return None
    if not cfg.allow_download:
        return "its weights are not on disk and codec.allow_download is false"
    if not url_reachable():
        return "its weights are not on disk and cannot be downloaded (no network?)"
    return None


def resolve_codec_name(cfg: CodecConfig) -> Literal["encodec", "mel"]:
    """The codec `build_codec` will use: `cfg.name`, or for `auto` EnCodec when it is at hand."""
    if cfg.name != "auto":
        return cfg.name
    return "encodec" if _encodec_unavailable_reason(cfg) is None else "mel"


def _load_mel(cfg: CodecConfig, data_dir: str | Path | None) -> MelCodec:
    if data_dir is None:
        raise CodecError("MelCodec is fitted on a corpus: pass the corpus folder (data.dir) to build_codec")
    path = mel_codec_path(data_dir)
    if not path.is_file():
        raise CodecError(f"{path} does not exist: the MelCodec is fitted on the corpus; "
                         f"run `ira data prepare --dir {data_dir}` first")
    codec = MelCodec.load(path, griffin_lim_iters=cfg.mel_griffin_lim_iters)
    if not codec.matches(cfg):
        raise CodecError(f"{path} holds a {codec.n_codebooks}x{codec.codebook_size} MelCodec over "
                         f"{codec.n_mels} mel bands, but the config asks for {cfg.mel_n_codebooks}x"
                         f"{cfg.mel_codebook_size} over {cfg.mel_n_mels}; run `ira data prepare --dir "
                         f"{data_dir}` to re-fit it")
    return codec


def build_codec(cfg: CodecConfig, data_dir: str | Path | None = None,
                device: str | torch.device = "cpu") -> Codec:
    """The configured codec. `mel` needs `data_dir` (its fitted file); `device` is for EnCodec."""
    if cfg.name == "mel":
        return _load_mel(cfg, data_dir)
    if cfg.name == "encodec":
        return EncodecCodec(cfg.bandwidth, cfg.weights_dir, cfg.allow_download, device)
    reason = _encodec_unavailable_reason(cfg)
    if reason is None:
        try:
            return EncodecCodec(cfg.bandwidth, cfg.weights_dir, cfg.allow_download, device)
        except CodecError as exc:
            reason = str(exc)
    log.warning("=" * 78 + "\ncodec 'auto': EnCodec is NOT used because %s.\nFalling back to the offline "
                "MelCodec (Griffin-Lim audio, lower quality). Set codec.name: mel to silence this, or make "
                "the EnCodec weights available.\n" + "=" * 78, reason)
    return _load_mel(cfg, data_dir)


def codec_to_tensors(codec: Codec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) to embed a codec in a checkpoint; see `codec_from_tensors`."""
    if not isinstance(codec, (MelCodec, EncodecCodec)):
        raise CodecError(f"cannot embed a {type(codec).__name__} in a checkpoint")
    return codec.to_tensors()


def codec_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                       cfg: CodecConfig | None = None, device: str | torch.device = "cpu") -> Codec:
    """Rebuild a codec from `codec_to_tensors` output: MelCodec from its tensors, EnCodec from its
    fingerprint (its weights found as `build_codec` finds them, with `cfg`'s weights_dir)."""
    kind = meta.get("codec")
    if kind == "mel":
        return MelCodec.from_tensors(tensors, meta, source="the checkpoint's codec")
    if kind != "encodec":
        raise CodecError(f"the checkpoint's codec metadata names an unknown codec {kind!r}")
    try:
        bandwidth = float(meta["bandwidth"])
    except (KeyError, ValueError) as exc:
        raise CodecError(f"the checkpoint's EnCodec metadata has no valid bandwidth ({meta})") from exc
    cfg = cfg or CodecConfig()
    if meta.get("fingerprint", "").endswith("-untrained"):
        codec = EncodecCodec.untrained(bandwidth, device)
    else:
        codec = EncodecCodec(bandwidth, cfg.weights_dir, cfg.allow_download, device)
    if meta.get("fingerprint") != codec.fingerprint:
        raise CodecError(f"the checkpoint was made with codec {meta.get('fingerprint')!r}, but the EnCodec "
                         f"weights here give {codec.fingerprint!r}")
    return codec
