"""Where flowmap may write, and how: the output marker, the `--out` rules and the one family of atomic writers.

Output marker and `--out` rules
-------------------------------
Every output directory flowmap creates gets a `.flowmap-output.json`, written last, holding
`{"kind": "model" | "samples" | "run" | "encode" | "search" | "eval", "files": [every file we wrote, relative paths],
"flowmap_version": ...}`. An existing `--out` is replaced only when it is

* empty, or
* ours: a marker of the same kind, and nothing in it but the files the marker lists (plus the marker), or an
  export of an older flowmap without a marker that holds only the files that version wrote (`LEGACY_FILES`);

and never when it is (or contains) a source the command reads, a symbolic link, not a directory, or read-only.
Anything else fails up front with one line naming `--force` (commands that have it: `force_flag`) or another
path; `--force` lifts only the "ours" rule. `check_output` is that up-front check (every command calls it before any work).

Replacement is atomic (`atomic_dir`): the new output is written complete into `.NAME.<pid>.<random>.tmp` beside
`--out`, the old one is renamed aside to `.NAME.<pid>.<random>.old`, the new one renamed in, and the old one
removed. A run killed half-way leaves only such dot-names; the next run for the same `--out` removes those whose
process id is no longer alive (never another live run's). Single files use `atomic_file` (same naming) and
`write_text_atomic`. Directories written in place over time (the fine-tuner's run dir) are marked with
`mark_output`; `output_kind` reads a marker back (e.g. `--resume` needs kind "run").
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FlowmapError

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT_PREFIX = "flowmap/"  # config.json["flowmap_format"] of every export
MARKER_NAME = ".flowmap-output.json"
KINDS = ("model", "samples", "run", "encode", "search", "eval")
# What flowmap versions before the marker wrote, by kind (a directory holding only these may be replaced).
LEGACY_FILES = {
    "model": re.compile(r"^(config\.json|model\.safetensors|README\.md)$"),
    "samples": re.compile(r"^(\d{6}\.png|grid\.png|samples\.json|samples\.npz)$"),
}
LEGACY_REQUIRED = {"model": (CONFIG_NAME, WEIGHTS_NAME), "samples": ("samples.json",)}
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.(tmp|old|part)(\.[\w]+)?$")


# ----------------------------------------------------------------------------------------------- small helpers
def _pid_alive(pid: int) -> bool:
    """True when a process with this id exists (ours included)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid <= 2**31  # someone else's live process (or an absurd number: not ours to judge)
    return True


def clean_stale(directory: str | os.PathLike, name: str) -> list[Path]:
    """Remove `.NAME.<pid>.*.tmp|old|part` leftovers of killed runs in `directory` (dead pids only)."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STALE.match(p.name)
        if not m or m.group("name") != name or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_error(out, e: OSError, then: str = "") -> FlowmapError:
    """The one sentence for a failed write (disk full, file too large, permissions...); `then` adds a next step."""
    reason = e.strerror or str(e)
    if e.errno in DISK_FULL_ERRNOS:
        return FlowmapError(f"cannot write {out} ({reason}); free some disk space or choose another --out{then}.")
    return FlowmapError(f"cannot write {out} ({reason}); choose a writable --out directory{then}.")


def _files_under(directory: Path) -> list[str]:
    """Relative posix paths of every file (and symlink) under `directory`, the marker excluded."""
    out = []
    for root, dirs, files in os.walk(directory):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, n).relative_to(directory).as_posix()
            if rel != MARKER_NAME:
                out.append(rel)
    return sorted(out)


# ----------------------------------------------------------------------------------------------- output marker
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"output kind {kind!r} is not one of {KINDS}")


def mark_output(directory: str | os.PathLike, kind: str, files: list[str] | None = None) -> Path:
    """Write the marker into `directory` (files: what we wrote; default every file now present)."""
    from ._version import __version__

    _check_kind(kind)
    directory = Path(directory)
    data = {"kind": kind, "files": sorted(files) if files is not None else _files_under(directory)}
    data["flowmap_version"] = __version__
    write_text_atomic(directory / MARKER_NAME, json.dumps(data, indent=1) + "\n")
    return directory / MARKER_NAME


def output_kind(directory: str | os.PathLike) -> str | None:
    """The kind recorded in a directory's marker, or None (no marker, unreadable marker)."""
    marker = _read_marker(Path(directory))
    return marker["kind"] if marker else None


def _read_marker(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("files"), list):
        return None
    return data


def _ours(directory: Path, kind: str) -> tuple[bool, str]:
    """(replaceable without --force, why not) for an existing directory."""
    try:
        present = _files_under(directory)
        empty = not any(directory.iterdir())
    except OSError as e:
        return False, f"cannot be read ({e.strerror})"
    if empty:
        return True, ""
    marker = _read_marker(directory)
    if marker is not None:
        if marker["kind"] != kind:
            return False, f"is a flowmap {marker['kind']} output, not a {kind} output"
        extra = sorted(set(present) - {str(f) for f in marker["files"]})
        if extra:
            return False, f"holds files flowmap did not write ({', '.join(extra[:3])})"
        return True, ""
    legacy = LEGACY_FILES.get(kind)
    if (
        legacy is not None
        and all(legacy.match(f) for f in present)
        and all(f in present for f in LEGACY_REQUIRED[kind])
        and (kind != "model" or is_model_dir(directory))
    ):
        return True, ""
    return False, "is not a flowmap output (or holds files flowmap did not write)"


def _within(inner: Path, outer: Path) -> bool:
    """True when `inner` is `outer` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def _refuse_sources(out: Path, target: Path, sources, flag: str) -> None:
    """One line when `out` is, or holds, a local path the command reads (builtin:NAME, URLs and Hub ids skipped)."""
    for src in sources or ():
        if src is None:
            continue
        text = str(src)
        if ":" in text.split("/")[0] and not Path(text).exists():  # builtin:NAME, https://...
            continue
        sp = Path(os.path.expanduser(text))
        if sp.exists() and _within(sp.resolve(), target):
            raise FlowmapError(f"{flag} {out} is the source being read; choose another {flag}.")


def check_output(
    out: str | os.PathLike,
    kind: str,
    *,
    force: bool = False,
    sources=(),
    flag: str = "--out",
    force_flag: str | None = None,
) -> Path:
    """Fail now (one FlowmapError) if `out` may not be written or replaced; returns it as a Path.

    `sources` are what the command reads (local paths; other strings are ignored): an `out` that is, or holds,
    one of them is refused even with --force. `force` replaces a directory that is not ours; `force_flag` is the
    option that sets it, named in the refusal (None for commands that have no such option).
    """
    _check_kind(kind)
    out = Path(out)
    if str(out).strip() == "":
        raise FlowmapError(f"{flag} is empty; pass an output directory.")
    if out.is_symlink():
        raise FlowmapError(f"{flag} {out} is a symbolic link; pass the real directory or another {flag}.")
    target = out.resolve()
    _refuse_sources(out, target, sources, flag)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FlowmapError(f"cannot write to {out} ({parent} is a file, not a directory); choose another {flag}.")
    if out.exists():
        if not out.is_dir():
            raise FlowmapError(f"{flag} {out} exists and is a file, not a directory; choose another {flag}.")
        if not os.access(target.parent, os.W_OK | os.X_OK) or not stat.S_IMODE(out.stat().st_mode) & stat.S_IWUSR:
            raise FlowmapError(f"{flag} {out} is read-only; make it writable or choose another {flag}.")
        ok, why = _ours(out, kind)
        if not ok and not force:
            hint = f"pass {force_flag} to replace it, or " if force_flag else ""
            raise FlowmapError(f"{flag} {out} exists and {why}; {hint}choose another {flag}.")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise FlowmapError(f"cannot write to {out} ({parent} is not writable); choose another {flag}.")
    clean_stale(target.parent, target.name)
    return out


def check_workdir(out: str | os.PathLike, kind: str, what: str, flag: str = "--out", sources=()) -> Path:
    """Up-front check of a directory written in place and resumed (a fine-tune run, a search, an evaluation).

    It may be new, empty, or one of ours of the same kind (its marker says so, and its contents are ours to
    update); a file, or a directory holding anything else (a user's folder, a model, samples), is refused in one
    line before any work, and nothing is changed.
    """
    _check_kind(kind)
    out = Path(out)
    _refuse_sources(out, out.resolve(), sources, flag)
    if out.exists() and not out.is_dir():
        raise FlowmapError(f"{flag} {out} is a file; choose a directory for the {what}.")
    held = output_kind(out) if out.is_dir() and any(out.iterdir()) else kind
    if held != kind:
        held = f"a flowmap {held} output" if held else "files flowmap did not write"
        raise FlowmapError(
            f"{flag} {out} holds {held}, not a {what}; choose a new or empty directory (nothing was changed)."
        )
    return out


# ----------------------------------------------------------------------------------------------- atomic writers
def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_dir(out: str | os.PathLike, kind: str, *, force: bool = False, sources=(), force_flag: str | None = None):
    """Yield a temporary sibling directory; on success it gets the marker and replaces `out` by rename.

    The old `out` (checked again by `check_output` right before the swap) is renamed aside, the new one renamed
    in, the old one removed. On any failure the temporary directory is removed and `out` is left untouched;
    OSErrors (disk full, permissions) become one FlowmapError.
    """
    out = check_output(out, kind, force=force, sources=sources, force_flag=force_flag)
    parent = out.absolute().parent
    name = out.absolute().name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the final directory should get the usual permissions
    except OSError as e:
        raise write_error(out, e) from None
    aside = None
    try:
        try:
            yield tmp
            mark_output(tmp, kind)
            check_output(out, kind, force=force, sources=sources, force_flag=force_flag)  # nothing changed meanwhile
            if out.exists():
                aside = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
                os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except OSError:
                if aside is not None:
                    os.rename(aside, out)
                    aside = None
                raise
        except OSError as e:
            raise write_error(out, e) from None
    except BaseException:
        if aside is not None and aside.exists() and not out.exists():  # interrupted mid-swap: the old one goes back
            try:
                os.rename(aside, out)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary sibling path that replaces `path` only if the block succeeds (removed otherwise).

    `suffix` keeps writers that append an extension (np.savez adds `.npz`) from renaming the temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    clean_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically (temporary sibling, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# ----------------------------------------------------------------------------------------------- model dirs


def is_model_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by flowmap (config.json with our format marker + weights)."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
        return False
    try:
        fmt = json.loads((p / CONFIG_NAME).read_text()).get("flowmap_format", "")
        return isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX)
    except (OSError, ValueError, AttributeError):
        return False
