"""What an archive run transcribes: files, folders searched for media, manifests; and where
each input's outputs go under the output directory."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

from ..errors import SusurrusError

# Found in folders by extension; a file named on the command line or in a manifest is
# tried whatever its name (a failure is then recorded, as for any bad input).
MEDIA_EXTENSIONS = frozenset(
    ".3gp .aac .ac3 .aif .aiff .amr .ape .au .avi .caf .dts .flac .flv .m2ts .m4a .m4b .m4v "
    ".mka .mkv .mov .mp2 .mp3 .mp4 .mpeg .mpg .mts .oga .ogg .ogv .opus .spx .ts .vob .wav "
    ".weba .webm .wma .wmv .wv".split()
)
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl")
PATH_COLUMNS = ("path", "file", "audio", "filename")
LANGUAGE_COLUMNS = ("language", "lang")


@dataclass
class Item:
    """One input: its absolute path, where its outputs go (`stem`: relative to the output
    directory, without extension), its language when a manifest gives one, and what
    identifies its content for a rerun (size and mtime; -1 when it cannot be read)."""

    id: int
    path: str
    stem: str
    language: str | None = None
    size: int = -1
    mtime_ns: int = -1
    attempts: int = 0

    def __fspath__(self) -> str:
        # Sessions and their saved state take the item where a path goes.
        return self.path


def _is_manifest(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(MANIFEST_EXTENSIONS)


def _column(fields: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {name.strip().lower(): name for name in fields}
    return next((lowered[n] for n in names if n in lowered), None)


def read_manifest(path: str) -> list[tuple[str, str | None]]:
    """(path, language or None) per row of a CSV, TSV or JSON-lines manifest; paths
    relative to the manifest's folder."""
    base = os.path.dirname(os.path.abspath(path))
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.lower().endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise SusurrusError(f"{path}: line {number}: not JSON ({exc})") from None
                    if not isinstance(row, dict):
                        raise SusurrusError(f"{path}: line {number}: not a JSON object")
                    rows.append(row)
            else:
                lines = [line for line in f if line.strip() and not line.startswith("#")]
                delimiter = "\t" if path.lower().endswith(".tsv") else ","
                rows = list(csv.DictReader(lines, delimiter=delimiter))
    except OSError as exc:
        raise SusurrusError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise SusurrusError(f"{path}: the manifest is not UTF-8 text") from None
    if not rows:
        return []
    path_key = _column(list(rows[0]), PATH_COLUMNS)
    if path_key is None:
        raise SusurrusError(
            f"{path}: no path column (one of {', '.join(PATH_COLUMNS)}) in the manifest"
        )
    language_key = _column(list(rows[0]), LANGUAGE_COLUMNS)
    entries = []
    for row in rows:
        value = str(row.get(path_key) or "").strip()
        if not value:
            continue
        language = str(row.get(language_key) or "").strip() if language_key else ""
        entries.append((os.path.join(base, os.path.expanduser(value)), language or None))
    return entries


def _walk(folder: str) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS:
                found.append(os.path.join(directory, name))
    return found


def discover(inputs: list[str], output_dir: str | None = None) -> list[Item]:
    """Every input file once, in the order given, each with an output stem of its own.

    Outputs mirror the input tree: a folder's files keep their paths below it, and inputs
    from several places keep their paths below the deepest folder common to all of them.
    Two inputs that would write the same name (a.mp3 and a.wav) keep their extension in it.
    A missing command-line input is a usage error (SusurrusError)."""
    from ..tokenizer import language_code

    out = os.path.abspath(output_dir) if output_dir else None
    found: list[tuple[str, str, str | None]] = []  # (path, root, language)
    for given in inputs:
        path = os.path.abspath(os.path.expanduser(given))
        if os.path.isdir(path):
            for media in _walk(path):
                if out is None or os.path.commonpath([out, media]) != out:
                    found.append((media, path, None))
        elif _is_manifest(path):
            for media, language in read_manifest(path):
                if language is not None:
                    try:
                        language = language_code(language)
                    except SusurrusError as exc:
                        raise SusurrusError(f"{given}: {media}: {exc}") from None
                found.append((os.path.normpath(media), os.path.dirname(media), language))
        elif os.path.exists(path):
            found.append((path, os.path.dirname(path), None))
        else:
            raise SusurrusError(f"{given}: no such file or folder")

    first: dict[str, int] = {}
    unique: list[tuple[str, str, str | None]] = []
    for path, root, language in found:
        if path not in first:
            first[path] = len(unique)
            unique.append((path, root, language))
        elif language is not None:
            # Named twice (a folder and a manifest): the manifest's language holds.
            kept = unique[first[path]]
            unique[first[path]] = (kept[0], kept[1], language)
    if not unique:
        return []
    common = os.path.commonpath([root for _, root, _ in unique])
    relative = [os.path.relpath(path, common) for path, _, _ in unique]
    stems = _stems(relative)

    items = []
    for number, ((path, _, language), stem) in enumerate(zip(unique, stems)):
        item = Item(id=number, path=path, stem=stem, language=language)
        try:
            info = os.stat(path)
            item.size, item.mtime_ns = info.st_size, info.st_mtime_ns
        except OSError:
            pass  # recorded as failed when it is transcribed
        items.append(item)
    return items


def _stems(relative: list[str]) -> list[str]:
    """Output stems for distinct relative paths, distinct even on a file system that
    ignores case: the name without extension, else with it, else numbered."""
    plain = [os.path.splitext(rel)[0] for rel in relative]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    used: set[str] = set()
    stems = []
    for rel, stem in zip(relative, plain):
        candidate = stem if counts[stem.casefold()] == 1 else rel
        number = 1
        while candidate.casefold() in used:
            number += 1
            candidate = f"{rel}~{number}"
        used.add(candidate.casefold())
        stems.append(candidate)
    return stems
