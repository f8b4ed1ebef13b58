"""The one output guard: every mme command that writes goes through :func:`claim`.

``prepare``, ``poison`` (public and private), ``protect``, ``export``, ``attack``, ``train``,
``evaluate`` and ``report`` declare what they write (:class:`Folder` / :class:`File`) and what
they read (``inputs``), and write only inside ``with claim(...)``:

- **Ownership.** A folder an mme command made holds a marker, ``.mme-owner``: JSON naming the
  command, the folder's role (``public`` / ``private`` / ``out`` / ``run`` ...) and the run (a
  digest of its settings; the same settings give the same marker, so DVC sees the same folder).
  A non-empty folder is written only when its marker names the same command *and* role: a
  ``mme poison`` private folder is never taken as a public one, an ``mme prepare`` output never
  by ``mme attack``. A folder without a marker (a home folder, a user's photos) is never
  touched. ``force`` never widens this: it only lets a command that keeps its earlier output by
  default (``export``, ``protect``) replace it.
- **Tied folders.** A private folder's marker names its public folder (relative to itself:
  the project may move); a run with another public folder is refused, so a second run with a
  different ``--out`` cannot overwrite the first run's noise.
- **Files.** A file output (``metrics.json``, a report) is written only over a file of its own
  kind (``File.kind``), never over an input, a folder, a link or a device.
- **No overlap.** No output may equal, contain or sit inside an input or another output.
- **Lock.** Each output folder is locked (:func:`mme.fsio.locked`) for the whole block; the
  checks run again under the locks. A file output is not (its lock file would sit beside it,
  e.g. in a DVC-tracked ``metrics/`` folder): it is replaced atomically.

Every refusal is an :class:`OutputRefused` (a :class:`~mme.config.ConfigError`: one line, exit
2) raised before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mme import fsio
from mme.config import ConfigError

MARKER = fsio.OWNER  # ".mme-owner"
MARKER_CAP = 1 << 16  # bytes of a marker we read; a bigger one is not ours
# Folders written before markers existed, recognised by what is in them (see _legacy_owner).
TRAIN_NAMES = {"trainer", "pairs", "checkpoint.pt", "train_loss.csv", "train_loss.png"}
TRAIN_NAMES |= {"train.json", "metrics.json", ".gitignore"}


class OutputRefused(ConfigError):
    """An output the command may not write; nothing was changed. The message names the fix."""


@dataclass(frozen=True)
class Owner:
    """What a marker says: the command, the folder's role, the run; a private folder's
    ``public`` is its public folder, relative to the private one."""

    command: str
    role: str = "out"
    run: str = ""
    public: str | None = None

    def to_text(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(fields, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Folder:
    """A folder a command writes. ``needs_force``: an earlier output of the command is kept
    unless ``force``; ``tied_to``: the public folder this (private) folder belongs to;
    ``staged``: built in a staging folder the caller marks (:meth:`Claim.mark`), else the
    marker is written into the folder when it is claimed; ``legacy``: commands whose outputs,
    marked before markers named a run, this one replaces (it wrote them under their name)."""

    path: Path
    role: str = "out"
    flag: str = "--out"
    needs_force: bool = False
    tied_to: Path | None = None
    staged: bool = False
    legacy: tuple[str, ...] = ()


@dataclass(frozen=True)
class File:
    """A file a command writes; ``kind(path)`` is True for a file the command writes (the
    only kind of existing file it replaces)."""

    path: Path
    kind: Callable[[Path], bool]
    flag: str = "--out"


Output = Folder | File


def run_id(command: str, settings: Any) -> str:
    """The run as markers name it: a digest of the command and its settings (JSON-able)."""
    text = json.dumps([command, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Claim:
    """What :func:`claim` yields: the command and run, to mark staged folders with."""

    command: str
    run: str

    def owner(self, folder: Folder) -> Owner:
        public = None
        if folder.tied_to is not None:
            public = os.path.relpath(Path(folder.tied_to).resolve(), Path(folder.path).resolve())
        return Owner(self.command, folder.role, self.run, public)

    def mark(self, where: Path, folder: Folder) -> None:
        """Write ``folder``'s marker into ``where`` (the folder itself or its staging copy)."""
        fsio.write_text(Path(where) / MARKER, self.owner(folder).to_text())


@contextlib.contextmanager
def claim(
    command: str,
    outputs: Sequence[Output | None],
    inputs: Mapping[str, Path | str | None],
    *,
    force: bool = False,
    settings: Any = None,
) -> Iterator[Claim]:
    """Check ``outputs`` against the rules of this module, lock them, check again under the
    locks, mark the in-place folders, and yield a :class:`Claim`; raises :class:`OutputRefused`
    (or it as :class:`~mme.fsio.FolderBusy`'s message) before anything is written."""
    outs = [o for o in outputs if o is not None]
    check(command, outs, inputs, force=force)
    done = Claim(command, run_id(command, settings))
    folders = [o for o in outs if isinstance(o, Folder)]  # a file is replaced atomically
    with contextlib.ExitStack() as stack:
        for out in sorted(folders, key=lambda o: str(Path(o.path).resolve())):  # one lock order
            try:
                stack.enter_context(fsio.locked(out.path))
            except fsio.FolderBusy as err:
                raise OutputRefused(str(err)) from None
        check(command, outs, inputs, force=force)  # another writer may have changed them
        for out in outs:
            if isinstance(out, Folder) and not out.staged:
                Path(out.path).mkdir(parents=True, exist_ok=True)
                done.mark(out.path, out)
        yield done


def check(
    command: str,
    outputs: Sequence[Output],
    inputs: Mapping[str, Path | str | None],
    *,
    force: bool = False,
) -> None:
    """Every rule but the lock (see the module doc); raises :class:`OutputRefused`."""
    for i, out in enumerate(outputs):
        others = {f"output {o.flag} ({o.path})": o.path for o in outputs[i + 1 :]}
        try:
            fsio.check_disjoint(out.path, {**inputs, **others}, out.flag)
        except fsio.UnsafePath as err:
            raise OutputRefused(
                f"{err}: outputs must differ from the inputs and each other (none overlaps one)"
            ) from None
        if isinstance(out, File):
            _check_file(command, out)
        else:
            _check_folder(command, out, force)


def _check_file(command: str, out: File) -> None:
    path = Path(out.path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise OutputRefused(f"{out.flag} {path} is not a plain file: choose another path")
    if not out.kind(path):
        raise OutputRefused(
            f"{out.flag} {path} exists and is not a file `{command}` writes: refusing to "
            "overwrite it (choose another path, or remove it yourself)"
        )


def _check_folder(command: str, out: Folder, force: bool) -> None:
    path = Path(out.path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputRefused(f"{out.flag} {path} is not a plain folder: choose another one")
    owner = owner_of(path)
    if owner is None:
        return  # absent or empty: a fresh output
    older = owner.command in out.legacy and not owner.run  # a marker written before runs
    if not older and (owner.command != command or owner.role != out.role):
        made = f"`{owner.command}` made it as its {owner.role} folder" if owner.command else ""
        noun = command.split()[-1]  # say why --force does not help either
        force_note = f"; --force replaces only an earlier {noun}, this is not one"
        force_note = force_note if out.needs_force else ""
        raise OutputRefused(
            f"{out.flag} {path} is not empty and was not made by `{command}` as its "
            f"{out.role} folder ({made or 'no mme command made it'}): refusing to touch it "
            f"(choose another folder, or remove it yourself){force_note}"
        )
    _check_tie(out, owner)
    if out.needs_force and not force:
        raise OutputRefused(
            f"{out.flag} {path} holds an earlier output: pass --force to replace it"
        )


def _check_tie(out: Folder, owner: Owner) -> None:
    if out.tied_to is None or owner.public is None:
        return  # not a tied folder, or one marked before ties were recorded
    mine = Path(out.path).resolve()
    theirs = (mine / owner.public).resolve()
    if theirs != Path(out.tied_to).resolve():
        raise OutputRefused(
            f"{out.flag} {out.path} holds the private files of {theirs}, not of "
            f"{out.tied_to}: give this run its own {out.flag} folder (or remove that one "
            "yourself if its public set is gone)"
        )


def owner_of(folder: Path | str) -> Owner | None:
    """The owner of ``folder``: None when it is absent or empty, ``Owner("")`` when no mme
    command made it (no marker, or one that is not ours)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    marker = folder / MARKER
    if marker.exists() or marker.is_symlink():
        return _read_marker(folder, marker)
    return _legacy_owner(folder)


def _read_marker(folder: Path, marker: Path) -> Owner:
    try:  # a marker may be a DVC cache link: followed, but plain files under the cap only
        text = fsio.read_regular(marker.resolve(), MARKER_CAP).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return Owner("")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _legacy_role(folder, text.strip())  # markers before runs: the command alone
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return Owner("")
    try:
        return Owner(**data)
    except TypeError:
        return Owner("")


def _legacy_owner(folder: Path) -> Owner:
    """Outputs made before markers: a ``manifest.json`` naming its command, an ``mme protect``
    private area (its ``protect.json``), or a run folder of ``mme train`` (nothing but its own
    files)."""
    manifest = folder / "manifest.json"
    if manifest.is_file() and not manifest.is_symlink():
        try:
            made = json.loads(fsio.read_regular(manifest, 1 << 24)).get("created_by")
        except (OSError, ValueError, AttributeError, RecursionError):
            made = None
        if isinstance(made, str) and made.startswith("mme "):
            return _legacy_role(folder, made)
    state = folder / "protect.json"
    if state.is_file() and not state.is_symlink():  # an mme protect private area
        return Owner("mme protect", "private")
    if {p.name for p in folder.iterdir()} <= TRAIN_NAMES:
        return Owner("mme train", "run")
    return Owner("")


def _legacy_role(folder: Path, command: str) -> Owner:
    if not command.startswith("mme "):
        return Owner("")
    if command == "mme protect":  # its private area holds its state
        return Owner(command, "private" if (folder / "protect.json").exists() else "out")
    if command != "mme poison":
        return Owner(command, "run" if command == "mme train" else "out")
    public = (folder / "manifest.json").exists() or any(folder.glob("train-*.tar"))
    return Owner(command, "public" if public else "private")


# ------------------------------------------------------------------------- kinds of file


def json_object_with(*keys: str) -> Callable[[Path], bool]:
    """A :attr:`File.kind`: a JSON object (at most 16 MiB) holding every one of ``keys``."""

    def kind(path: Path) -> bool:
        try:
            data = json.loads(fsio.read_regular(path, 1 << 24))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    return kind


def text_starting_with(*prefixes: str) -> Callable[[Path], bool]:
    """A :attr:`File.kind`: a UTF-8 text file whose first bytes are one of ``prefixes``."""

    def kind(path: Path) -> bool:
        try:
            head = fsio.read_head(path, 4096).decode("utf-8", "replace")
        except OSError:
            return False
        return any(head.lower().startswith(p.lower()) for p in prefixes)

    return kind
