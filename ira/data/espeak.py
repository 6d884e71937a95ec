"""A small ctypes binding to the eSpeak NG library shipped by the `espeakng-loader` package.

eSpeak NG keeps its voice, parameters and callback in global state, so every call goes through
one module-level lock. It runs in synchronous mode: the samples come back through a callback
while `espeak_Synth` runs, nothing is played. Each call loads a fresh copy (see `_instance`).
"""

from __future__ import annotations

import _ctypes
import ctypes
import os
import re
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7

RATE_RANGE = (80, 450)
"""Speaking rates eSpeak accepts, in words per minute (its default is 175)."""

# Dialects of English in the packaged data (lang/gmw/en*), by voice file name.  The Shavian
# voice (en-Shaw) reads the Shavian alphabet, not Latin text, so it is left out.
ENGLISH_VOICES: dict[str, str] = {
    "en-us": "American",
    "en-us-nyc": "New York",
    "en": "British",
    "en-gb-x-rp": "British RP",
    "en-gb-scotland": "Scottish",
    "en-gb-x-gbclan": "Lancastrian",
    "en-gb-x-gbcwmd": "West Midlands",
    "en-029": "Caribbean",
}

# Voice variants (voices/!v/<name>) with the gender they are meant to sound like.
VARIANT_GENDERS: dict[str, str] = {
    **{f"m{i}": "male" for i in range(1, 8)},
    **{f"f{i}": "female" for i in range(1, 6)},
    "croak": "male",
    "whisper": "male",
    "whisperf": "female",
    "klatt": "male",
    "klatt2": "male",
    "klatt3": "male",
}


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or could not speak; the message says what to do."""


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _VoiceStruct(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class VoiceInfo:
    """One voice file in the eSpeak data: `identifier` like 'gmw/en-GB-scotland'."""

    name: str
    identifier: str

    @property
    def file_name(self) -> str:
        return self.identifier.rsplit("/", 1)[-1]


_lock = threading.RLock()
_chunks: list[np.ndarray] = []
_copy_dir: tempfile.TemporaryDirectory | None = None


@_CALLBACK
def _on_samples(wav, n, _events):  # noqa: ANN001 - ctypes callback signature
    if wav and n > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0  # 0 = keep going


def _paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as exc:
        raise EspeakError(
            "the Python package 'espeakng-loader' is not installed; run scripts/setup.sh "
            "(or `pip install espeakng-loader`)") from exc
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _private_copy() -> str:
    """This process's own copy of the library (caller holds the lock).

    Loading a private copy guarantees that nobody else (another package using espeakng-loader)
    keeps it loaded, so unloading it really discards eSpeak's global state.
    """
    global _copy_dir
    lib_path, _ = _paths()
    if not Path(lib_path).is_file():
        raise EspeakError(f"the eSpeak NG library {lib_path} is missing; reinstall it with "
                          "`pip install --force-reinstall espeakng-loader`")
    copy = Path(_copy_dir.name) / Path(lib_path).name if _copy_dir else None
    if copy is None or not copy.is_file():
        _copy_dir = tempfile.TemporaryDirectory(prefix="ira-espeak-")
        copy = Path(_copy_dir.name) / Path(lib_path).name
        shutil.copy2(lib_path, copy)
    return str(copy)


def _declare(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))


def _unload(lib: ctypes.CDLL) -> None:
    (_ctypes.FreeLibrary if sys.platform == "win32" else _ctypes.dlclose)(lib._handle)


@contextmanager
def _instance() -> Iterator[tuple[ctypes.CDLL, int]]:
    """A freshly loaded and initialised library, unloaded afterwards (caller holds the lock).

    eSpeak NG keeps glottal phase, pitch flutter and noise state in static variables that
    survive espeak_Terminate, so the same call would give slightly different samples depending
    on what was spoken before. A fresh load per utterance (about 5 ms) makes every clip a pure
    function of its text and settings.
    """
    path = _private_copy()
    _, data_path = _paths()
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
    except OSError as exc:
        raise EspeakError(
            f"cannot load the eSpeak NG library ({exc}); reinstall it with "
            "`pip install --force-reinstall espeakng-loader`, or use another data source "
            "(ira data ljspeech / ira data folder)") from exc
    _declare(lib)
    try:
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"eSpeak NG failed to initialise with its data folder {data_path} "
                              f"(code {rate}); reinstall espeakng-loader")
        lib.espeak_SetSynthCallback(_on_samples)
        yield lib, rate
    finally:
        lib.espeak_Terminate()
        _unload(lib)


def _seed_noise(lib: ctypes.CDLL) -> None:
    """Breathy and whispered variants draw noise from rand(): seed it for repeatable audio."""
    if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed(1)
    if sys.platform != "win32":
        ctypes.CDLL(None).srand(1)


def is_available() -> bool:
    """True when the library loads and initialises here."""
    try:
        sample_rate()
        return True
    except EspeakError:
        return False


def sample_rate() -> int:
    """eSpeak's native output rate in Hz (22050)."""
    with _lock, _instance() as (_, rate):
        return rate


@lru_cache(maxsize=1)
def list_voices() -> tuple[VoiceInfo, ...]:
    """Every language voice in the packaged data (variants excluded)."""
    with _lock, _instance() as (lib, _):
        array = lib.espeak_ListVoices(None)
        voices = []
        i = 0
        while array[i]:
            v = array[i].contents
            voices.append(VoiceInfo(v.name.decode("utf-8", "replace"), v.identifier.decode("utf-8", "replace")))
            i += 1
    return tuple(voices)


def english_voices() -> dict[str, str]:
    """The English dialects of `ENGLISH_VOICES` that this installation has: {voice: accent}."""
    present = {v.file_name.lower() for v in list_voices()}
    return {voice: accent for voice, accent in ENGLISH_VOICES.items() if voice in present}


def variants() -> list[str]:
    """Names of the voice variants (m1, f3, croak...) in the packaged data."""
    _, data_path = _paths()
    folder = Path(data_path) / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def standard_variants() -> dict[str, str]:
    """The variants of `VARIANT_GENDERS` that this installation has: {variant: gender}."""
    present = set(variants())
    return {name: gender for name, gender in VARIANT_GENDERS.items() if name in present}


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50, volume: int = 100, word_gap: int = 0) -> tuple[np.ndarray, int]:
    """Speak `text` -> (float32 waveform in [-1, 1], sample rate).

    voice: a voice file name with an optional variant, e.g. "en-gb-scotland+m3".
    rate: words per minute (80-450); pitch and pitch_range: 0-100 relative to the voice's own
    base pitch (50 = the voice's default); word_gap: extra pause between words in 10 ms units.
    """
    if not text or not text.strip():
        raise EspeakError("cannot synthesise an empty text")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise EspeakError(f"rate {rate} is outside eSpeak's range {RATE_RANGE[0]}-{RATE_RANGE[1]} words/min")
    for name, value, top in (("pitch", pitch, 100), ("pitch_range", pitch_range, 100), ("volume", volume, 200)):
        if not 0 <= value <= top:
            raise EspeakError(f"{name} {value} is outside eSpeak's range 0-{top}")
    data = text.encode("utf-8") + b"\0"
    with _lock, _instance() as (lib, rate_hz):
        chunks: list[np.ndarray] | None = None  # None: no such voice
        code = _EE_OK
        if lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range),
                                 (_VOLUME, volume), (_WORDGAP, word_gap)):
                lib.espeak_SetParameter(param, int(value), 0)
            _seed_noise(lib)
            _chunks.clear()
            buf = ctypes.create_string_buffer(data)
            code = lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            chunks = list(_chunks)
            _chunks.clear()
    if chunks is None:
        raise EspeakError(f"eSpeak NG has no voice {voice!r}; English voices here: "
                          f"{', '.join(english_voices())}; variants: {', '.join(standard_variants())}")
    if code != _EE_OK:
        raise EspeakError(f"eSpeak NG failed to speak {text[:60]!r} with voice {voice!r} (code {code})")
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return samples.astype(np.float32) / 32768.0, rate_hz


# ---------------------------------------------------------------------------------------------
# Grapheme-to-phoneme


CLAUSE_PUNCTUATION = ",.;:!?"
"""Punctuation that ends a clause for eSpeak; kept in the phoneme string after the clause it ends."""

_phonemizer: tuple[ctypes.CDLL, str] | None = None   # (library, voice) kept loaded for G2P
_phonemizer_dir: tempfile.TemporaryDirectory | None = None


def _phonemizer_library(voice: str) -> ctypes.CDLL:
    """A copy of the library loaded once and kept for G2P (caller holds the lock).

    It is a copy of its own, in another folder than `_private_copy`'s: the synthesiser unloads its copy
    after every utterance to drop eSpeak's state, which it could not do while this one held the same file.
    Phonemes do not depend on the synthesiser's state, so one loaded instance serves every call.
    """
    global _phonemizer, _phonemizer_dir
    if _phonemizer is not None and _phonemizer[1] == voice:
        return _phonemizer[0]
    if _phonemizer is None:
        lib_path, data_path = _paths()
        if not Path(lib_path).is_file():
            raise EspeakError(f"the eSpeak NG library {lib_path} is missing; reinstall it with "
                              "`pip install --force-reinstall espeakng-loader`")
        _phonemizer_dir = tempfile.TemporaryDirectory(prefix="ira-espeak-g2p-")
        copy = Path(_phonemizer_dir.name) / Path(lib_path).name
        shutil.copy2(lib_path, copy)
        try:
            lib = ctypes.CDLL(str(copy), mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:
            raise EspeakError(f"cannot load the eSpeak NG library ({exc}); reinstall it with "
                              "`pip install --force-reinstall espeakng-loader`") from exc
        _declare(lib)
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT) <= 0:
            raise EspeakError(f"eSpeak NG failed to initialise with its data folder {data_path}; "
                              "reinstall espeakng-loader")
    else:
        lib = _phonemizer[0]
    if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
        raise EspeakError(f"eSpeak NG has no voice {voice!r} to read text with; English voices here: "
                          f"{', '.join(english_voices())}")
    _phonemizer = (lib, voice)
    return lib


_PHONEMES_IPA = 0x02   # espeak_TextToPhonemes phonememode: IPA (UTF-8), no separators between phonemes


def text_to_phonemes(text: str, voice: str = "en-us") -> list[tuple[str, str]]:
    """eSpeak NG's reading of `text` as IPA, clause by clause: [(phonemes, punctuation that ended the
    clause, or "")]. Numbers, abbreviations and symbols come out as eSpeak speaks them ("$5" -> dollars).

    Phonemes carry stress marks (ˈ primary, ˌ secondary) and length marks; words are separated by spaces.
    """
    data = text.encode("utf-8")
    out: list[tuple[str, str]] = []
    with _lock:
        lib = _phonemizer_library(voice)
        buf = ctypes.create_string_buffer(data)
        start = ctypes.addressof(buf)
        pointer = ctypes.c_void_p(start)
        while pointer.value:
            before = pointer.value - start
            phonemes = lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
            after = (pointer.value - start) if pointer.value else len(data)
            clause = data[before:after].decode("utf-8", "replace")
            out.append(((phonemes or b"").decode("utf-8", "replace").strip(),
                        _clause_mark(clause, final=not pointer.value)))
    return out


_LOOK_AHEAD = re.compile(r"[^\s" + re.escape(CLAUSE_PUNCTUATION) + r"]+$")


def _clause_mark(clause: str, final: bool) -> str:
    """The punctuation that ended a clause eSpeak read. eSpeak's pointer stops a character or so into
    the next clause (its look-ahead), so that partial word is cut first; quotes and brackets closing the
    clause are skipped."""
    if not final:
        clause = _LOOK_AHEAD.sub("", clause)
    clause = clause.rstrip().rstrip("\"')]}\u201d\u2019").rstrip()
    return clause[-1] if clause and clause[-1] in CLAUSE_PUNCTUATION else ""
