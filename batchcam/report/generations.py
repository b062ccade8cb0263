"""A run's report files as one generation, published by one rename: a reader never sees two runs.

    REPORT/.batchcam/gen-<16 hex>/   one run's index.html, gallery/*, predictions.csv, manifest.json,
                                     metrics.json (with metrics), cams.npz (with --save-cams), and
                                     overlays -> ../../overlays, so its own pages resolve too
    REPORT/.batchcam/current         -> gen-<16 hex>, the published generation
    REPORT/<name>                    -> .batchcam/current/<name> for each top-level file it holds
    REPORT/gallery/<file>            -> ../.batchcam/current/gallery/<file>

Publishing: the generation is written in full before anyone can reach it (every file is first
created empty, so a page never links to a name that is not there, then filled and fsynced). Then
``current`` is replaced by one rename(2) of a new link. Every published name resolves through
``current``, so whatever a reader opens, at any instant, is the old generation's file or the new
one's. ``overlays/`` stays one real folder shared by all generations: an overlay's name is versioned
by its content and never rewritten.

Links never dangle, whenever a kill comes: before the switch, a name only the new generation has is
linked straight to it, and a name only the old one has is linked straight to the old one; after the
switch (``tidy``) the first become links through ``current`` and the second are removed, and only
then is the old generation removed. A generation is removed page by page after each page was first
replaced by an empty file (by rename: a backup's hard link keeps its copy), so its other pages never
link to a removed name either.

The record (``.batchcam/generations.json``) names every generation batchcam made, with the files
it writes there, before the folder is made: that is the proof that a folder is batchcam's. Every
recorded generation but the current one is removed by the next publication (an old one, or a
killed run's half-written one), and only the recorded files in it; a folder someone put a file in
is left with that file. A generation folder the record does not name is never touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from typing import BinaryIO

from batchcam.report.lock import CURRENT, STATE_DIR
from batchcam.runtime.fsutil import PlantedLink, SafeDir, temporary_of

RECORD = "generations.json"
GENERATION = re.compile(r"gen-[0-9a-f]{16}")
GALLERY, OVERLAYS = "gallery", "overlays"
OVERLAYS_LINK = f"../../{OVERLAYS}"   # from REPORT/.batchcam/gen-*/ back to REPORT/overlays
# The files a generation may hold, each published at the same name in REPORT.
GENERATION_FILE = re.compile(r"(predictions\.csv|manifest\.json|metrics\.json|cams\.npz|index\.html"
                             r"|gallery/[0-9A-Za-z][0-9A-Za-z._-]*)")
# Before generations, the report files were written in REPORT itself and listed in outputs.json.
LEGACY_OUTPUTS = "outputs.json"
LEGACY_ALWAYS = ("predictions.csv", "manifest.json", "index.html", "gallery/gallery.css", "gallery/gallery.js",
                 "gallery/review.js", "gallery/rows.js")
LEGACY_PAGE = re.compile(r"page-[0-9]+\.html")
NAME_TRIES = 16

Content = str | bytes | Callable[[BinaryIO], None]


def link_target(name: str) -> str:
    """What ``REPORT/<name>`` points at once published: the same name in the current generation."""
    return "../" * name.count("/") + f"{STATE_DIR}/{CURRENT}/{name}"


def direct_target(generation: str, name: str) -> str:
    """``REPORT/<name>`` pointing straight at one generation (only around a switch)."""
    return "../" * name.count("/") + f"{STATE_DIR}/{generation}/{name}"


def current_name(state: SafeDir) -> str | None:
    """The published generation: the ``current`` link's text, when it names a generation."""
    target = state.readlink(CURRENT)
    return target if target is not None and GENERATION.fullmatch(target) else None


def open_published(report: SafeDir) -> SafeDir | None:
    """The current generation of ``report`` opened (never through a link), or None for a report
    written before generations (no ``current``: its files are in REPORT itself).

    ValueError when ``current`` is anything but a link to one of batchcam's generation folders (a
    link planted to somewhere else is never followed).
    """
    try:
        state = report.subdir(STATE_DIR, create=False, replace_link=False)
    except FileNotFoundError:
        return None
    except PlantedLink:
        raise ValueError(f"{report.path / STATE_DIR} is a symbolic link, not batchcam's state folder") from None
    with state:
        return open_current(state)


def open_current(state: SafeDir) -> SafeDir | None:
    """``open_published`` for REPORT's state folder ``state``."""
    if state.lstat(CURRENT) is None:
        return None
    name = current_name(state)
    if name is None:
        raise ValueError(f"{state.path / CURRENT} is not one of batchcam's generations (a link to "
                         f"{GENERATION.pattern} in {STATE_DIR}/; a report copied without its links has a folder there)")
    try:
        return state.subdir(name, create=False, replace_link=False)
    except (FileNotFoundError, PlantedLink):
        raise ValueError(f"{state.path / CURRENT} names {name}, which is not one of batchcam's generation "
                         "folders") from None


def read_record(state: SafeDir) -> dict[str, list[str]]:
    """The recorded generations and their files; names that are not batchcam's are left out."""
    try:
        items = json.loads(state.read_text(RECORD) or "{}").get("generations", {}).items()
    except (ValueError, AttributeError):
        return {}
    return {name: sorted({f for f in files if isinstance(f, str) and GENERATION_FILE.fullmatch(f)})
            for name, files in items
            if isinstance(name, str) and GENERATION.fullmatch(name) and isinstance(files, list)}


def write_record(state: SafeDir, record: dict[str, list[str]]) -> None:
    state.write_bytes(RECORD, (json.dumps({"generations": record}, indent=1) + "\n").encode())
    state.fsync()


def _split(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    return folder, base


class NewGeneration:
    """A generation being written. Every recorded file exists from the start (empty, or linked from
    the generation it reuses), so a page never links to a missing name, even while half-written."""

    def __init__(self, name: str, folder: SafeDir, files: Iterable[str]):
        self.name = name
        self.folder = folder
        self.files = sorted(files)
        self.gallery = folder.subdir(GALLERY) if any(f.startswith(f"{GALLERY}/") for f in self.files) else None
        self.written: set[str] = set()

    def _place(self, name: str) -> tuple[SafeDir, str]:
        if name not in self.files:
            raise ValueError(f"{name!r} is not a file this generation was recorded with")
        folder, base = _split(name)
        if not folder:
            return self.folder, base
        if folder != GALLERY or self.gallery is None:
            raise ValueError(f"{name!r}: a generation holds files at its top and in {GALLERY}/ only")
        return self.gallery, base

    def reuse(self, name: str, source: SafeDir) -> None:
        """``name`` as another link of the file of the same base name in ``source`` (the current
        generation, or REPORT before generations): evaluate and review re-render the gallery of a
        scan whose CSV, manifest and maps stay as they are. Call before ``make_empty``."""
        folder, base = self._place(name)
        source.link_to(base, folder, base)
        self.written.add(name)

    def make_empty(self) -> None:
        """Every recorded file not reused yet, created empty (O_EXCL): a page written next may link to any."""
        for name in self.files:
            if name not in self.written:
                folder, base = self._place(name)
                folder.create(base).close()

    def write(self, name: str, content: Content) -> None:
        """Fill ``name`` with ``content`` (text, bytes, or a function writing to the binary file), fsynced."""
        folder, base = self._place(name)
        with folder.open_existing(base) as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        self.written.add(name)

    def finish(self) -> None:
        """Every recorded file written, and the folders' entries on disk."""
        missing = sorted(set(self.files) - self.written)
        if missing:
            raise ValueError(f"generation {self.name} is missing {', '.join(missing)}")
        for folder in (self.gallery, self.folder):
            if folder is not None:
                folder.fsync()

    def close(self) -> None:
        for folder in (self.gallery, self.folder):
            if folder is not None:
                folder.close()


class Generations:
    """REPORT's generations, under the report's lock: publish a new one, remove the old ones.

    ``report`` and ``state`` are REPORT and its state folder; ``gallery()`` opens REPORT/gallery/,
    where the gallery's links live (a real folder, so a file of yours there stays where it is).
    """

    def __init__(self, report: SafeDir, state: SafeDir, gallery: Callable[[], SafeDir]):
        self.report = report
        self.state = state
        self.gallery = gallery

    def _place(self, name: str) -> tuple[SafeDir, str]:
        """Where REPORT's entry for a generation file ``name`` is."""
        folder, base = _split(name)
        return (self.gallery() if folder else self.report), base

    def _relink(self, name: str, target: str) -> bool:
        """``REPORT/<name>`` made a link to ``target``; False when it already was one."""
        folder, base = self._place(name)
        if folder.readlink(base) == target:
            return False
        folder.replace_with_link(base, target)
        return True

    # ---- writing a generation ---------------------------------------------------------------------------

    def begin(self, files: Iterable[str]) -> NewGeneration:
        """A new generation folder for ``files``, recorded before it is made."""
        files = sorted(files)
        for name in files:
            if not GENERATION_FILE.fullmatch(name):
                raise ValueError(f"{name!r} is not a file a generation holds")
        record = read_record(self.state)
        for _ in range(NAME_TRIES):
            name = f"gen-{secrets.token_hex(8)}"
            if self.state.lstat(name) is not None:
                continue
            write_record(self.state, {**record, name: files})
            try:
                self.state.make_folder(name)
            except FileExistsError:  # made by someone else since: not ours, not recorded
                write_record(self.state, record)
                continue
            folder = self.state.subdir(name, create=False, replace_link=False)
            try:
                folder.symlink(OVERLAYS, OVERLAYS_LINK)
                return NewGeneration(name, folder, files)
            except BaseException:
                folder.close()
                raise
        raise FileExistsError(f"no free generation name in {self.state.path}")

    def switch(self, new: NewGeneration) -> None:
        """Publish ``new``: link the names it adds straight to it, and the names only the old one has
        straight to the old one, then replace ``current`` in one rename. A failure undoes the links
        it made, so REPORT is left as it was."""
        old = current_name(self.state)
        old_files = set(read_record(self.state).get(old, [])) if old else set()
        undo: list[tuple[str, str | None]] = []   # (name, what its link said before; None: nothing there)
        try:
            for name in new.files:
                target = link_target(name) if name in old_files else direct_target(new.name, name)
                folder, base = self._place(name)
                before, had_nothing = folder.readlink(base), folder.lstat(base) is None
                if self._relink(name, target) and (had_nothing or before is not None):
                    undo.append((name, before))
            for name in sorted(old_files - set(new.files)):  # none without an old generation
                folder, base = self._place(name)
                if old and folder.readlink(base) == link_target(name):
                    self._relink(name, direct_target(old, name))
                    undo.append((name, link_target(name)))
            self.report.fsync()
            if any(_split(name)[0] for name in (*new.files, *old_files)):
                self.gallery().fsync()
            self._make_current(new.name)
        except BaseException:
            for name, before in reversed(undo):
                with contextlib.suppress(OSError):
                    folder, base = self._place(name)
                    folder.unlink(base) if before is None else folder.replace_with_link(base, before)
            raise

    def _make_current(self, name: str) -> None:
        self.state.replace_with_link(CURRENT, name)
        self.state.fsync()

    def abandon(self, new: NewGeneration) -> None:
        """Remove a generation that was never published (best effort: the next ``tidy`` retries)."""
        new.close()
        with contextlib.suppress(OSError):
            record = read_record(self.state)
            self._remove(new.name, record.get(new.name, new.files))
            record.pop(new.name, None)
            write_record(self.state, record)

    # ---- after a switch, and before the next -----------------------------------------------------------

    def tidy(self) -> None:
        """Every link of REPORT through ``current`` for the current generation's files, none for
        other names; then every other recorded generation removed (nothing links to it any more)."""
        current = current_name(self.state)
        record = read_record(self.state)
        needed = set(record.get(current, [])) if current else set()
        for name in self._our_links(record):
            if name in needed:
                self._relink(name, link_target(name))
            else:
                folder, base = self._place(name)
                folder.unlink(base)
        self.report.fsync()
        for name, files in record.items():
            if name != current:
                self._remove(name, files)
        kept = {name: files for name, files in record.items() if name == current}
        if kept != record:
            write_record(self.state, kept)

    def _our_links(self, record: dict[str, list[str]]) -> list[str]:
        """The names in REPORT and REPORT/gallery that are batchcam's links: through ``current``, or
        straight to a recorded generation."""
        found = []
        for folder, prefix in ((self.report, ""), (self.gallery(), f"{GALLERY}/")):
            for base in folder.names():
                name = prefix + base
                if not GENERATION_FILE.fullmatch(name):
                    continue
                target = folder.readlink(base)
                if target == link_target(name) or target in {direct_target(g, name) for g in record}:
                    found.append(name)
        return found

    def _remove(self, name: str, files: list[str]) -> None:
        """Remove a recorded generation: each page first replaced by an empty file (so the pages left
        never link to a removed name), then its recorded files and batchcam's own temporary files,
        its overlays link, and its folders once empty (a file of someone else's keeps them)."""
        try:
            folder = self.state.subdir(name, create=False, replace_link=False)
        except FileNotFoundError:
            return
        except PlantedLink:
            self.state.unlink(name)  # a link in its place: removed, its target never touched
            return
        with folder:
            gallery = None
            if folder.lstat(GALLERY) is not None and not folder.is_link(GALLERY):
                gallery = folder.subdir(GALLERY, create=False, replace_link=False)
            try:
                by_folder = [(folder, {base for where, base in map(_split, files) if not where})]
                if gallery is not None:
                    by_folder.append((gallery, {base for where, base in map(_split, files) if where}))
                for place, bases in by_folder:
                    for base in sorted(bases):
                        if base.endswith(".html") and place.is_file(base):
                            place.empty(base)
                for place, bases in by_folder:
                    for entry in place.names():  # the files, and a killed removal's empty page not yet renamed
                        found = place.lstat(entry)
                        if ((entry in bases or temporary_of(entry) in bases)
                                and found is not None and not stat.S_ISDIR(found.st_mode)):
                            place.unlink(entry)
            finally:
                if gallery is not None:
                    gallery.close()
            if folder.readlink(OVERLAYS) == OVERLAYS_LINK:
                folder.unlink(OVERLAYS)
            folder.rmdir(GALLERY)
        self.state.rmdir(name)  # not empty: someone's file is in it, and stays

    # ---- a report written before generations --------------------------------------------------------

    def adopt_legacy(self) -> None:
        """A report written before generations (no ``current``) becomes a generation of its own.

        Its files are linked into a new generation, which becomes ``current`` while nothing links
        through it yet; then each file in REPORT is replaced by the link to the very same file. A
        reader sees the same bytes throughout, whenever a kill comes; a file of yours at another name,
        in ``gallery/`` too, stays where it is.
        """
        if self.state.lstat(CURRENT) is not None:
            self.state.unlink(LEGACY_OUTPUTS)
            return
        files = self._legacy_files()
        if files:
            new = self.begin(files)
            try:
                for name in files:
                    new.reuse(name, self._place(name)[0])
                new.finish()
                self._make_current(new.name)
            except BaseException:
                self.abandon(new)
                raise
            new.close()
            for name in files:
                self._relink(name, link_target(name))
            self.report.fsync()
            self.gallery().fsync()
        self.state.unlink(LEGACY_OUTPUTS)

    def _legacy_files(self) -> list[str]:
        """The report files the last run before generations wrote in REPORT (its outputs.json, or for
        a report without one, the names only batchcam gives), that are regular files there now."""
        text = self.state.read_text(LEGACY_OUTPUTS)
        try:
            listed = set(json.loads(text)["files"]) if text is not None else None
        except (ValueError, KeyError, TypeError):
            listed = None
        if listed is None:
            pages = (f"{GALLERY}/{name}" for name in self.gallery().names() if LEGACY_PAGE.fullmatch(name))
            listed = {"metrics.json", *pages}
        names = {name for name in listed | set(LEGACY_ALWAYS)
                 if isinstance(name, str) and GENERATION_FILE.fullmatch(name)}
        return sorted(name for name in names if self._place(name)[0].is_file(_split(name)[1]))

