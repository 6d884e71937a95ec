"""EnCodec 24 kHz (the `encodec` package) behind the Codec interface.

The weights file is looked up in `weights_dir`, then in torch.hub's cache, then downloaded into
that cache (when allowed). The model is built with random weights and the state dict is loaded
here with ``torch.load(weights_only=True)`` after checking the sha256 prefix in the file name,
so nothing is unpickled and a wrong file is caught before use. A model without its weights has
all-zero codebooks (every frame becomes token 0): only `EncodecCodec.untrained` builds one, for
shape tests, and its fingerprint says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import urllib.request
import warnings
from pathlib import Path

import torch
from encodec import EncodecModel
from encodec.model import ROOT_URL

from ira.audio import prepare_waveform
from ira.codec.base import Codec, CodecError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "encodec_24khz-d7cc33bc.th"
WEIGHTS_URL = ROOT_URL + WEIGHTS_FILE
WEIGHTS_SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]
"""The file name carries the first hex digits of the file's sha256, as torch.hub and encodec check."""
BANDWIDTH_CODEBOOKS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
PROBE_TIMEOUT_S = 3.0


def hub_checkpoint_dir() -> Path:
    """Where torch.hub caches downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weight_candidates(weights_dir: str | Path | None) -> list[Path]:
    """The places the weights file is looked for, in order."""
    folders = ([Path(weights_dir).expanduser()] if weights_dir else []) + [hub_checkpoint_dir()]
    return [folder / WEIGHTS_FILE for folder in folders]


def find_weights(weights_dir: str | Path | None = None) -> Path | None:
    """The first existing weights file among `weight_candidates`, or None."""
    return next((path for path in weight_candidates(weights_dir) if path.is_file()), None)


@functools.lru_cache(maxsize=4)
def url_reachable(url: str = WEIGHTS_URL, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a HEAD request to `url` succeeds within `timeout` (asked once per process)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as reply:
            return 200 <= reply.status < 400
    except Exception:  # offline, DNS failure, proxy, timeout...: all mean "cannot download now"
        return False


def _missing_weights(weights_dir: str | Path | None, reason: str) -> CodecError:
    where = " or ".join(str(p.parent) for p in weight_candidates(weights_dir))
    return CodecError(
        f"EnCodec weights {WEIGHTS_FILE} not found in {where}, and {reason}. Download {WEIGHTS_URL} "
        f"and put it in {hub_checkpoint_dir()} (or in a folder named by codec.weights_dir), "
        f"or use the offline codec with codec.name: mel.")


def ensure_weights(weights_dir: str | Path | None = None, allow_download: bool = True) -> Path:
    """Path of the weights file: found on disk, or downloaded into torch.hub's cache."""
    found = find_weights(weights_dir)
    if found is not None:
        return found
    if not allow_download:
        raise _missing_weights(weights_dir, "downloading is disabled (codec.allow_download: false)")
    if not url_reachable(WEIGHTS_URL):
        raise _missing_weights(weights_dir, f"{WEIGHTS_URL} cannot be reached (offline?)")
    target = hub_checkpoint_dir() / WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading EnCodec weights %s to %s", WEIGHTS_URL, target)
    try:  # writes a temporary file and renames it; checks the sha256 prefix
        torch.hub.download_url_to_file(WEIGHTS_URL, str(target), hash_prefix=WEIGHTS_SHA256_PREFIX, progress=True)
    except Exception as exc:
        raise CodecError(f"downloading {WEIGHTS_URL} to {target} failed ({exc}); retry, or download it "
                         f"yourself into {target.parent}, or use codec.name: mel") from exc
    return target


def verify_checksum(path: Path) -> str:
    """Check the file's sha256 against the prefix its name promises; returns the prefix."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    actual = sha.hexdigest()[: len(WEIGHTS_SHA256_PREFIX)]
    if actual != WEIGHTS_SHA256_PREFIX:
        raise CodecError(f"{path}: checksum mismatch (sha256 starts with {actual}, expected "
                         f"{WEIGHTS_SHA256_PREFIX}); the file is damaged or not the EnCodec 24 kHz weights. "
                         f"Delete it and download {WEIGHTS_URL} again.")
    return actual


def _build_model() -> EncodecModel:
    with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore")
        return EncodecModel.encodec_model_24khz(pretrained=False)


def load_weights(model: EncodecModel, path: Path) -> None:
    """Load a verified weights file into `model` (weights only, strict keys, trained codebooks)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecError(f"{path}: cannot be read as an EnCodec state dict ({exc}); delete it and "
                         f"download {WEIGHTS_URL} again") from exc
    if not isinstance(state, dict):
        raise CodecError(f"{path}: expected a state dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CodecError(f"{path}: does not fit the EnCodec 24 kHz model ({exc})") from exc
    for i, layer in enumerate(model.quantizer.vq.layers):
        book = layer._codebook
        if not bool(book.inited.all()) or not bool(book.embed.abs().sum() > 0):
            raise CodecError(f"{path}: codebook {i} is untrained (all zeros); these are not the "
                             f"pretrained EnCodec weights")


class EncodecCodec(Codec):
    """EnCodec 24 kHz: 75 frames/s, codebooks of 1024, K = bandwidth x 4/3 (1.5 kbps -> 2, 6 -> 8, 24 -> 32)."""

    name = "encodec"
    sample_rate = 24_000
    frame_rate = 75.0
    codebook_size = 1024

    def __init__(self, bandwidth: float = 6.0, weights_dir: str | Path | None = None,
                 allow_download: bool = True, device: str | torch.device = "cpu"):
        self._check_bandwidth(bandwidth)
        path = ensure_weights(weights_dir, allow_download)
        checksum = verify_checksum(path)
        model = _build_model()
        load_weights(model, path)
        self._setup(model, bandwidth, checksum, device)
        self.weights_path = path

    @classmethod
    def untrained(cls, bandwidth: float = 6.0, device: str | torch.device = "cpu") -> "EncodecCodec":
        """The architecture with random encoder weights and all-zero codebooks: for shape tests only."""
        cls._check_bandwidth(bandwidth)
        codec = cls.__new__(cls)
        codec._setup(_build_model(), bandwidth, "untrained", device)
        codec.weights_path = None
        return codec

    @staticmethod
    def _check_bandwidth(bandwidth: float) -> None:
        if float(bandwidth) not in BANDWIDTH_CODEBOOKS:
            raise CodecError(f"EnCodec bandwidth {bandwidth!r} kbps is not one of "
                             f"{', '.join(f'{b:g}' for b in BANDWIDTH_CODEBOOKS)}")

    def _setup(self, model: EncodecModel, bandwidth: float, checksum: str, device: str | torch.device) -> None:
        self.bandwidth = float(bandwidth)
        self.n_codebooks = BANDWIDTH_CODEBOOKS[self.bandwidth]
        self.checksum = checksum
        self.device = torch.device(device)
        model.set_target_bandwidth(self.bandwidth)
        self.model = model.to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        return f"encodec-24khz-{self.bandwidth:g}kbps-{self.checksum}"

    def encode(self, wav: torch.Tensor, sr: int) -> torch.Tensor:
        mono = prepare_waveform(wav, sr, self.sample_rate)
        with torch.inference_mode():
            frames = self.model.encode(mono.to(self.device)[None, None])
        return torch.cat([codes for codes, _ in frames], dim=-1)[0].long().cpu()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[0] != self.n_codebooks or codes.shape[1] == 0:
            raise CodecError(f"{self.fingerprint} decodes codes of shape [{self.n_codebooks}, T>0], "
                             f"got {tuple(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            raise CodecError(f"{self.fingerprint}: token values must be in [0, {self.codebook_size}), "
                             f"got values from {low} to {high}")
        with torch.inference_mode():
            wav = self.model.decode([(codes.long().to(self.device)[None], None)])
        return wav[0, 0].float().cpu()

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """No tensors (the weights live in their own file): just what `codec_from_tensors` rebuilds."""
        return {}, {"codec": self.name, "bandwidth": f"{self.bandwidth:g}", "fingerprint": self.fingerprint}
