"""Sticker datasets: prepare a user's folder once, then stream it into training.

:func:`prepare_dataset` turns a folder of GIF / WebP / APNG / MP4 stickers plus a captions
file (JSONL or CSV with VSD2M-style fields: ``file``, ``caption_zh``, ``caption_en``,
optional ``keyframes``; other fields are carried into the manifest) into::

    OUT/dataset.json           settings every item shares (F, size, background, selection)
    OUT/manifest.jsonl         one JSON object per prepared sticker, in captions order
    OUT/frames/<key>.png       its F keyframes as one horizontal strip (see rdtf.keyframes)
    OUT/shards/shard-%05d.tar  optional WebDataset-style shards: <key>.png + <key>.json
    OUT/report.json, report.md counts, settings and every skipped file with its reason

Bad entries and files are skipped with a reason and never stop the others. The source
folder is only read. A run that is interrupted resumes: finished stickers are journalled
to ``manifest.partial.jsonl`` as they complete, a re-run reuses every item whose frames
file exists and whose source still has the same SHA-256, and the manifest is written
atomically at the end. Output does not depend on the number of worker processes.

:class:`StickerDataset` (map-style) and :class:`ShardedStickerDataset` (streams the
shards, disjoint per rank and DataLoader worker) load the result as
``video (3, F, H, W)`` in [-1, 1] plus ``loss_mask``, ``fps`` and captions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from rdtf.io import SUFFIX_FORMATS, write_atomic
from rdtf.keyframes import (
    SELECTION_METHODS,
    Background,
    StickerJob,
    StickerOutcome,
    decode_strip,
    file_sha256,
    prepare_sticker,
)

SETTINGS_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
JOURNAL_FILE = "manifest.partial.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FRAMES_DIR = "frames"
SHARDS_DIR = "shards"
SHARD_NAME = "shard-{:05d}.tar"
CAPTION_FILES: tuple[str, ...] = ("captions.jsonl", "captions.csv")
DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
DATASET_FORMAT = "rdtf-stickers/1"

#: Manifest fields the preparation derives; a captions field of the same name is not carried.
DERIVED_FIELDS: tuple[str, ...] = (
    "key",
    "source",
    "frames",
    "num_frames",
    "num_real",
    "loss_mask",
    "fps",
    "durations_ms",
    "keyframes",
    "keyframe_selection",
    "source_frames",
    "source_sha256",
)
CAPTION_FIELDS: tuple[str, ...] = ("caption_en", "caption_zh")


def manifest_hash(data: str | Path) -> str:
    """A prepared dataset's identity (its manifest's digest): what a training card records it trained on."""
    return hashlib.sha256((Path(data) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]


class CaptionsError(ValueError):
    """A captions file that cannot be used at all (unknown format, no ``file`` column)."""


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionEntry:
    """One usable line of a captions file."""

    line: int
    file: str
    caption_en: str
    caption_zh: str
    keyframes: tuple[int, ...] | None
    extra: dict[str, Any]


class _BadEntry(Exception):
    """Why one captions line or one entry is skipped (reported, never raised to the user)."""


def read_captions(path: str | Path) -> tuple[list[CaptionEntry], list[tuple[str, str]]]:
    """Entries of a ``.jsonl`` or ``.csv`` captions file, plus ``(where, reason)`` for bad lines.

    Each line is decoded on its own, so one line with invalid UTF-8 is reported
    (``captions.jsonl:7``) while every other line is kept.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise CaptionsError(f"{path}: captions must be a .jsonl or .csv file")
    if not path.is_file():
        raise CaptionsError(f"{path}: captions file not found")
    raw = path.read_bytes()
    records = _jsonl_records(raw) if path.suffix.lower() == ".jsonl" else _csv_records(raw, path)
    entries: list[CaptionEntry] = []
    problems: list[tuple[str, str]] = []
    for line, record in records:
        try:
            if isinstance(record, _BadEntry):
                raise record
            entries.append(_entry_from_record(record, line))
        except _BadEntry as problem:
            problems.append((f"{path.name}:{line}", str(problem)))
    return entries, problems


def _jsonl_records(raw: bytes) -> Iterator[tuple[int, dict[str, Any] | _BadEntry]]:
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, _BadEntry(f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, _BadEntry(f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        yield number, record if isinstance(record, dict) else _BadEntry("not a JSON object")


def _csv_records(raw: bytes, path: Path) -> Iterator[tuple[int, dict[str, Any] | _BadEntry]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the CSV still parses
    # and each record with bad bytes can be reported on its own.
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "file" not in reader.fieldnames:
        raise CaptionsError(f"{path}: the CSV header needs a 'file' column (found {reader.fieldnames or 'no header'})")
    for row in reader:
        line = reader.line_num
        if None in row:
            yield line, _BadEntry(f"{len(row[None])} more fields than the header")
            continue
        cells = {name: value if value is not None else "" for name, value in row.items()}
        if any(_has_undecodable(value) for value in cells.values()):
            yield line, _BadEntry("not valid UTF-8")
            continue
        if cells.get("keyframes", "") == "":
            cells.pop("keyframes", None)
        yield line, cells


def _has_undecodable(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def _entry_from_record(record: dict[str, Any], line: int) -> CaptionEntry:
    file = record.get("file")
    if not isinstance(file, str) or not file.strip():
        raise _BadEntry("no 'file' field naming the sticker")
    captions = {}
    for name in CAPTION_FIELDS:
        value = record.get(name, "")
        if not isinstance(value, str):
            raise _BadEntry(f"{name} must be text, got {type(value).__name__}")
        captions[name] = value
    extra = {name: value for name, value in record.items() if name not in ("file", "keyframes", *CAPTION_FIELDS)}
    keyframes = _parse_keyframes(record.get("keyframes"))
    return CaptionEntry(line, file, captions["caption_en"], captions["caption_zh"], keyframes, extra)


def _parse_keyframes(value: Any) -> tuple[int, ...] | None:
    """``[0, 3, 7]`` from JSON, or ``"0 3 7"`` / ``"[0, 3, 7]"`` / ``"0;3;7"`` from a CSV cell."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [part for part in re.split(r"[\s,;\[\]]+", value) if part]
        if not all(re.fullmatch(r"\d+", part) for part in parts):
            raise _BadEntry(f"keyframes {value!r}: expected frame indices like '0 3 7'")
        value = [int(part) for part in parts]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _BadEntry(f"keyframes {value!r}: expected a list of frame indices")
    if not value:
        raise _BadEntry("keyframes is empty")
    if any(b <= a for a, b in zip(value, value[1:], strict=False)) or value[0] < 0:
        raise _BadEntry(f"keyframes {value}: indices must be >= 0 and strictly increasing")
    return tuple(value)


def locate_entry(root: Path, file: str) -> tuple[str, Path]:
    """``(relative posix path, absolute path)`` of a captions entry that stays inside ``root``."""
    text = file.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(file).drive:
        raise _BadEntry("absolute path; entries must be relative to the dataset root")
    relative = posixpath.normpath(text)
    if relative == ".." or relative.startswith("../"):
        raise _BadEntry("points outside the dataset root")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise _BadEntry("points outside the dataset root (through a symbolic link)")
    return relative, path


def sticker_keys(relative_paths: list[str]) -> dict[str, str]:
    """A unique, file-name-safe key per source path, with no dots (WebDataset splits keys at dots).

    ``stickers/cat.gif`` -> ``stickers_cat``; paths that would share a key (``cat.gif``,
    ``cat.png``) all get a short hash of their path appended.
    """
    base = {
        path: re.sub(r"[^0-9A-Za-z_-]+", "_", posixpath.splitext(path)[0]).strip("_") or "sticker"
        for path in relative_paths
    }
    counts: dict[str, int] = {}
    for key in base.values():
        counts[key] = counts.get(key, 0) + 1
    return {
        path: key if counts[key] == 1 else f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        for path, key in base.items()
    }


# --------------------------------------------------------------------------- report


@dataclass
class PrepareReport:
    """What one preparation run did; saved as ``report.json`` and ``report.md``."""

    out: Path
    source: Path
    settings: dict[str, Any]
    prepared: int = 0
    reused: int = 0
    padded: int = 0
    num_shards: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Stickers in the manifest."""
        return self.prepared + self.reused

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "source": str(self.source),
            "settings": self.settings,
            "counts": {
                "in_manifest": self.total,
                "prepared": self.prepared,
                "reused": self.reused,
                "padded": self.padded,
                "skipped": len(self.skipped),
                "shards": self.num_shards,
            },
            "seconds": round(self.seconds, 3),
            "skipped": [{"file": file, "reason": reason} for file, reason in self.skipped],
        }

    def summary(self) -> str:
        """A few lines for a terminal or a notebook cell."""
        lines = [
            f"{self.total} stickers in {self.out / MANIFEST_FILE} ({self.prepared} prepared, {self.reused} reused, "
            f"{self.padded} padded to {self.settings['num_frames']} frames), {len(self.skipped)} skipped, "
            f"{self.num_shards} shards, {self.seconds:.1f} s",
            *(f"  skipped {file}: {reason}" for file, reason in self.skipped[:10]),
        ]
        if len(self.skipped) > 10:
            lines.append(f"  ... {len(self.skipped) - 10} more in {self.out / REPORT_MD}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        counts = self.to_dict()["counts"]
        lines = [
            "# Sticker dataset report",
            "",
            f"Prepared `{self.source}` into `{self.out}` in {self.seconds:.1f} s.",
            "",
            "| setting | value |",
            "| --- | --- |",
            *(f"| {name} | {_cell(value)} |" for name, value in self.settings.items()),
            "",
            "| count | stickers |",
            "| --- | --- |",
            *(f"| {name.replace('_', ' ')} | {value} |" for name, value in counts.items()),
            "",
            f"## Skipped ({len(self.skipped)})",
            "",
        ]
        if self.skipped:
            lines += ["| file | reason |", "| --- | --- |", *(f"| {_cell(f)} | {_cell(r)} |" for f, r in self.skipped)]
        else:
            lines.append("Nothing was skipped.")
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- preparation


def prepare_dataset(
    source: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    num_frames: int = 8,
    size: int = 64,
    background: Background = DEFAULT_BACKGROUND,
    selection: str = "uniform",
    seed: int = 0,
    workers: int = 1,
    shard_size: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every sticker listed in the captions file of ``source`` into the dataset ``out``.

    ``captions`` defaults to ``source/captions.jsonl`` or ``source/captions.csv``; its
    ``file`` paths are relative to ``source``. Stickers are cut to ``num_frames``
    keyframes (explicit ``keyframes`` in the captions win over ``selection``), padded
    when shorter, fitted into ``size`` x ``size`` and composited on ``background``
    (``None`` keeps RGBA). ``workers`` > 1 runs that many processes (a script that
    calls this needs the usual ``if __name__ == "__main__":`` guard); ``shard_size``
    also writes tar shards of that many stickers. Returns the report that is also
    written to ``out/report.json`` and ``out/report.md``.
    """
    started = time.perf_counter()
    settings = _check_settings(num_frames, size, background, selection, seed)
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1 (or None for no shards)")
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: source folder not found")
    if out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"out={out} is inside source={source}; the source folder is never written to")
    captions_path = _captions_path(source, captions)
    entries, skipped = read_captions(captions_path)
    _claim_output(out, settings)
    fill = None if background is None else tuple(background)

    report = PrepareReport(out=out, source=source, settings=settings, skipped=skipped)
    located = _locate_entries(source, entries, report.skipped)
    keys = sticker_keys([relative for _, relative, _ in located])
    previous = _previous_rows(out)
    jobs: list[tuple[str, StickerJob]] = []
    derived: dict[str, dict[str, Any]] = {}
    for entry, relative, path in located:
        key = keys[relative]
        frames_path = out / FRAMES_DIR / f"{key}.png"
        wanted = "explicit" if entry.keyframes is not None else selection
        if _reusable(previous.get(key), relative, path, frames_path, wanted, entry.keyframes):
            derived[key] = {name: previous[key][name] for name in DERIVED_FIELDS}
            report.reused += 1
        else:
            job = StickerJob(path, frames_path, num_frames, size, fill, selection, seed, entry.keyframes)
            jobs.append((key, job))

    failures: dict[str, str] = {}
    with (
        tqdm(total=len(jobs), desc="prepare", unit="sticker", disable=not progress) as bar,
        open(out / JOURNAL_FILE, "a", encoding="utf-8") as journal,
    ):
        for (key, job), outcome in zip(jobs, _outcomes([job for _, job in jobs], workers), strict=True):
            if outcome.fields is None:
                failures[key] = str(outcome.skip_reason)
            else:
                source_file = job.source.relative_to(source).as_posix()
                derived[key] = {
                    "key": key,
                    "source": source_file,
                    "frames": f"{FRAMES_DIR}/{key}.png",
                    **outcome.fields,
                }
                journal.write(_json_line(derived[key]))
                journal.flush()
            bar.update()
    report.prepared = len(jobs) - len(failures)

    rows: list[dict[str, Any]] = []
    for entry, relative, _ in located:
        key = keys[relative]
        if key in failures:
            report.skipped.append((entry.file, failures[key]))
        else:
            rows.append(_manifest_row(entry, derived[key]))
    mentioned = {posixpath.normpath(entry.file.replace("\\", "/")) for entry in entries}
    report.skipped += _unlisted_media(source, mentioned, captions_path)
    report.padded = sum(1 for row in rows if row["num_real"] < row["num_frames"])

    write_atomic(out / MANIFEST_FILE, "".join(_json_line(row) for row in rows).encode("utf-8"))
    (out / JOURNAL_FILE).unlink(missing_ok=True)
    _remove_orphan_frames(out, {row["key"] for row in rows})
    report.num_shards = write_shards(out, rows, shard_size)
    report.seconds = time.perf_counter() - started
    write_atomic(out / REPORT_JSON, json.dumps(report.to_dict(), ensure_ascii=False, indent=2).encode("utf-8"))
    write_atomic(out / REPORT_MD, report.to_markdown().encode("utf-8"))
    return report


def _check_settings(num_frames: int, size: int, background: Background, selection: str, seed: int) -> dict[str, Any]:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: must be an integer >= 1")
    if not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size={size!r}: must be an integer >= 8 and a multiple of 8")
    if selection not in SELECTION_METHODS:
        raise ValueError(f"selection={selection!r}: expected one of {', '.join(SELECTION_METHODS)}")
    if background is not None and (
        not isinstance(background, (tuple, list))
        or len(background) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in background)
    ):
        raise ValueError(f"background={background!r}: expected (R, G, B) integers 0-255, or None to keep RGBA")
    return {
        "format": DATASET_FORMAT,
        "num_frames": num_frames,
        "size": size,
        "background": list(background) if background is not None else None,
        "selection": selection,
        "seed": seed,
        "padding": "repeat last frame (loss_mask 0)",
        "frames_layout": "one PNG per sticker: F frames side by side, F*size wide, size tall",
    }


def _captions_path(source: Path, captions: str | Path | None) -> Path:
    if captions is not None:
        path = Path(captions)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: captions file not found")
        return path
    for name in CAPTION_FILES:
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{source}: no {' or '.join(CAPTION_FILES)}; pass captions=PATH to name the captions file")


def _claim_output(out: Path, settings: dict[str, Any]) -> None:
    """Create ``out`` or check that it holds a dataset prepared with the same settings."""
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text(encoding="utf-8"))
        changed = {name: (existing.get(name), value) for name, value in settings.items() if existing.get(name) != value}
        if changed:
            details = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
            raise ValueError(f"{out} holds a dataset prepared with other settings ({details}); use a new output folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not empty and holds no {SETTINGS_FILE}; use a new output folder")
    (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(settings_path, json.dumps(settings, indent=2).encode("utf-8"))


def _locate_entries(
    source: Path, entries: list[CaptionEntry], skipped: list[tuple[str, str]]
) -> list[tuple[CaptionEntry, str, Path]]:
    """Entries whose file exists inside ``source``, each once; problems go to ``skipped``."""
    first_line: dict[str, int] = {}
    located = []
    for entry in entries:
        try:
            relative, path = locate_entry(source, entry.file)
            if relative in first_line:
                raise _BadEntry(f"duplicate entry (first listed on line {first_line[relative]})")
            if not path.exists():
                raise _BadEntry("file not found")
            if not path.is_file():
                raise _BadEntry("not a regular file")
        except _BadEntry as problem:
            skipped.append((entry.file, str(problem)))
            continue
        first_line[relative] = entry.line
        located.append((entry, relative, path))
    return located


def _previous_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run: the finished manifest, then the journal of an interrupted one."""
    rows: dict[str, dict[str, Any]] = {}
    for name in (MANIFEST_FILE, JOURNAL_FILE):
        path = out / name
        if not path.is_file():
            continue
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the line an interrupted run was writing
                continue
            if isinstance(row, dict) and all(name in row for name in DERIVED_FIELDS):
                rows[row["key"]] = row
    return rows


def _reusable(
    row: dict[str, Any] | None,
    relative: str,
    path: Path,
    frames_path: Path,
    selection: str,
    keyframes: tuple[int, ...] | None,
) -> bool:
    return (
        row is not None
        and row["source"] == relative
        and row["keyframe_selection"] == selection
        and (keyframes is None or row["keyframes"] == list(keyframes))
        and frames_path.is_file()
        and row["source_sha256"] == file_sha256(path)
    )


def _outcomes(jobs: list[StickerJob], workers: int) -> Iterator[StickerOutcome]:
    """Outcomes of ``jobs`` in order, computed here or in ``workers`` processes."""
    if workers == 1 or len(jobs) < 2:
        yield from map(prepare_sticker, jobs)
        return
    # The platform's default start method, as DataLoader uses: fork on Linux (workers start in
    # milliseconds); where it is spawn or forkserver, each worker first re-imports the main script.
    executor = ProcessPoolExecutor(workers)
    try:
        yield from executor.map(prepare_sticker, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8))))
    finally:  # on an interruption, finish only the chunks already running
        executor.shutdown(wait=True, cancel_futures=True)


def _manifest_row(entry: CaptionEntry, derived: dict[str, Any]) -> dict[str, Any]:
    carried = {name: value for name, value in entry.extra.items() if name not in DERIVED_FIELDS}
    captions = {"caption_en": entry.caption_en, "caption_zh": entry.caption_zh}
    return {**{name: derived[name] for name in DERIVED_FIELDS}, **captions, **carried}


def _unlisted_media(source: Path, listed: set[str], captions_path: Path) -> list[tuple[str, str]]:
    found = sorted(
        path.relative_to(source).as_posix()
        for path in source.rglob("*")
        if path.suffix.lower() in SUFFIX_FORMATS and path.is_file()
    )
    return [(relative, f"not listed in {captions_path.name}") for relative in found if relative not in listed]


def _remove_orphan_frames(out: Path, keys: set[str]) -> None:
    """Frames of stickers no longer in the manifest, and temp files of interrupted writes."""
    for path in (out / FRAMES_DIR).iterdir():
        if path.stem not in keys or path.suffix != ".png":
            path.unlink()


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- shards


def write_shards(out: Path, rows: list[dict[str, Any]], shard_size: int | None) -> int:
    """Write ``out/shards/shard-%05d.tar`` of ``shard_size`` stickers each; returns how many.

    Members are ``<key>.png`` (the frames strip) and ``<key>.json`` (its manifest row),
    with fixed metadata so the same rows always give the same bytes. Shards left from an
    earlier run that this one does not write are removed.
    """
    shards_dir = out / SHARDS_DIR
    written: list[Path] = []
    if shard_size is not None:
        shards_dir.mkdir(exist_ok=True)
        for index, start in enumerate(range(0, len(rows), shard_size)):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for row in rows[start : start + shard_size]:
                    _add_member(tar, f"{row['key']}.png", (out / row["frames"]).read_bytes())
                    _add_member(tar, f"{row['key']}.json", json.dumps(row, ensure_ascii=False).encode("utf-8"))
            written.append(shards_dir / SHARD_NAME.format(index))
            write_atomic(written[-1], buffer.getvalue())
    if shards_dir.is_dir():
        for stale in set(shards_dir.iterdir()) - set(written):
            stale.unlink()
    return len(written)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def read_shard(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(frames png bytes, manifest row)`` per sticker of one shard, streamed in order."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            handle = tar.extractfile(member)
            assert handle is not None  # regular files always have data
            parts = pending.setdefault(key, {})
            parts[extension] = handle.read()
            if "png" in parts and "json" in parts:
                del pending[key]
                yield parts["png"], json.loads(parts["json"])
    if pending:
        raise ValueError(f"{path}: incomplete samples {sorted(pending)} (each needs .png and .json)")


# --------------------------------------------------------------------------- loading


def load_settings(root: str | Path) -> dict[str, Any]:
    """The ``dataset.json`` of a prepared dataset; a clear error when ``root`` is not one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found; create it with prepare_dataset() / `rdtf prepare`")
    path = root / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {SETTINGS_FILE}, so not a prepared sticker dataset")
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: format {settings.get('format')!r}, expected {DATASET_FORMAT!r}")
    return settings


def read_manifest(root: str | Path) -> list[dict[str, Any]]:
    """Rows of ``root/manifest.jsonl``."""
    root = Path(root)
    load_settings(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST_FILE}; the preparation did not finish, run it again to resume")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    return rows


def _frames_to_use(num_frames: int | None, settings: dict[str, Any]) -> int:
    stored = settings["num_frames"]
    if num_frames is None:
        return stored
    if not 1 <= num_frames <= stored:
        raise ValueError(f"num_frames={num_frames}: the dataset stores {stored} frames per sticker (use 1..{stored})")
    return num_frames


def _wanted(row: dict[str, Any], split: str | None, predicate: Callable[[dict[str, Any]], bool] | None) -> bool:
    return (split is None or row.get("split") == split) and (predicate is None or bool(predicate(row)))


def sticker_item(frames: np.ndarray, row: dict[str, Any], num_frames: int) -> dict[str, Any]:
    """One training sample from stored ``(F, S, S, C)`` frames and their manifest row.

    ``video`` is ``(3, num_frames, S, S)`` in [-1, 1] (the first ``num_frames`` stored
    frames). RGBA datasets are composited on white for ``video`` and also give ``alpha``
    ``(1, num_frames, S, S)`` in [0, 1].
    """
    pixels = torch.from_numpy(np.ascontiguousarray(frames[:num_frames])).permute(3, 0, 1, 2).float() / 255.0
    item: dict[str, Any] = {}
    rgb = pixels[:3]
    if pixels.shape[0] == 4:
        item["alpha"] = pixels[3:4]
        rgb = rgb * item["alpha"] + (1.0 - item["alpha"])
    item.update(
        video=rgb * 2.0 - 1.0,
        loss_mask=torch.tensor(row["loss_mask"][:num_frames], dtype=torch.float32),
        fps=float(row["fps"]),
        caption_en=row["caption_en"],
        caption_zh=row["caption_zh"],
        key=row["key"],
    )
    return item


class StickerDataset(Dataset):
    """A prepared sticker dataset, map-style: ``dataset[i]`` is a dict from :func:`sticker_item`.

    ``split`` keeps rows whose ``split`` field matches; ``predicate(row)`` filters further
    (it runs once here, so it need not be picklable for DataLoader workers);
    ``num_frames`` takes the first frames of each stored clip. ``rows`` holds the kept
    manifest rows, in order.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_frames: int | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = load_settings(self.root)
        self.num_frames = _frames_to_use(num_frames, self.settings)
        rows = read_manifest(self.root)
        self.rows = [row for row in rows if _wanted(row, split, predicate)]
        if not rows:
            raise ValueError(f"{self.root}: the manifest lists no stickers (report.md says why each was skipped)")
        if not self.rows:
            splits = sorted({str(row.get("split")) for row in rows})
            raise ValueError(f"{self.root}: no stickers match split={split!r} and the predicate (splits: {splits})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return sticker_item(decode_strip(self.root / row["frames"]), row, self.num_frames)


class ShardedStickerDataset(IterableDataset):
    """Streams ``root/shards/*.tar``; each (rank, DataLoader worker) reads its own shards.

    Shards are dealt to ranks first (``shards[rank::world_size]``), then to the workers
    of each rank, so every sticker is read exactly once per epoch across all processes.
    ``rank`` / ``world_size`` default to torch.distributed's when it is initialised.
    With ``shuffle`` the shard order and the order inside each shard change with
    :meth:`set_epoch`, identically on every rank. Ranks can get different numbers of
    stickers when the shards do not divide evenly: use ``shard_size`` and a shard count
    that are multiples of what the training needs. ``predicate`` runs in the workers.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_frames: int | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.settings = load_settings(self.root)
        self.num_frames = _frames_to_use(num_frames, self.settings)
        self.shards = sorted((self.root / SHARDS_DIR).glob("shard-*.tar"))
        if not self.shards:
            raise FileNotFoundError(f"{self.root}: no shards; prepare the dataset with shard_size=N to write them")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.rank, self.world_size = rank, world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}: must be in [0, world_size={self.world_size})")
        if self.world_size > len(self.shards):
            raise ValueError(
                f"{self.root}: {len(self.shards)} shards cannot feed {self.world_size} ranks; "
                "prepare with a smaller shard_size"
            )
        self.split, self.predicate = split, predicate
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call it on every rank before iterating)."""
        self.epoch = epoch

    def shards_for(self, worker: int, num_workers: int) -> list[Path]:
        """The shards that DataLoader ``worker`` of ``num_workers`` on this rank reads."""
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards_for(worker, num_workers):
            samples: Iterable[tuple[bytes, dict[str, Any]]] = read_shard(shard)
            if self.shuffle:
                samples = list(samples)
                rng = np.random.default_rng([self.seed, self.epoch, self.shards.index(shard)])
                samples = [samples[i] for i in rng.permutation(len(samples))]
            for png, row in samples:
                if _wanted(row, self.split, self.predicate):
                    yield sticker_item(decode_strip(png), row, self.num_frames)
