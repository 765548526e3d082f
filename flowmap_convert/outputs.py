"""Where flowmap may write, and how: the output marker, the `--out` rules, the one family of atomic writers, locks.

Output marker and `--out` rules
-------------------------------
Every output directory flowmap creates gets a `.flowmap-output.json`, written last, holding
`{"kind": "model" | "samples" | "run" | "encode" | "search" | "eval", "files": [every file we wrote, relative paths],
"hashes": {path: {"size": bytes, "sha256": hex}}, "flowmap_version": ...}`. A file is flowmap's only while it is
listed there, is a plain file (not a symbolic link) and still has the recorded size and sha256; a file the user
edited since, or added, is the user's. Files a run keeps appending to (metrics.jsonl, checkpoints/) are listed
without a hash and are flowmap's while they are plain files. An existing `--out` is replaced only when it is

* empty, or
* ours: a marker of the same kind, and nothing in it but unchanged files the marker lists (plus the marker);

and never when it is (or contains) a source the command reads, a symbolic link, not a directory, or read-only.
Anything else fails up front with one line naming `--force` (commands that have it: `force_flag`) or another
path; `--force` lifts only the "ours" rule. `check_output` is that up-front check (every command calls it before any work).

Replacement is atomic (`atomic_dir`): the new output is written complete into `.NAME.<pid>.<random>.tmp` beside
`--out`, the old one is renamed aside to `.NAME.<pid>.<random>.old`, the new one renamed in, and the old one
removed. Every such temporary name is claimed first by a small sidecar file `<temporary>.flowmap` that names it;
a run killed half-way leaves the temporary and its claim, and the next run for the same `--out` removes exactly
the claimed leftovers whose process id is no longer alive. A user's `.NAME.2024.backup.old/` has no claim and is
never touched. Single files use `atomic_file` (same naming) and `write_text_atomic`; none of them writes through
a symbolic link. Directories written in place over time (the fine-tuner's run dir) are marked with `mark_output`;
`output_kind` reads a marker back (e.g. `--resume` needs kind "run").

Locks
-----
`output_lock(out)` holds an exclusive `fcntl.flock` on `.NAME.flowmap-lock` beside `--out` for as long as a
command writes there (sample, eval, convert, encode, a fine-tune run dir); a second writer is refused at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__
from .errors import FlowmapError

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT_PREFIX = "flowmap/"  # config.json["flowmap_format"] of every export
MARKER_NAME = ".flowmap-output.json"
CLAIM_SUFFIX = ".flowmap"  # `<temporary>.flowmap`: the claim that makes a temporary name flowmap's leftover
LOCK_SUFFIX = ".flowmap-lock"
KINDS = ("model", "samples", "run", "encode", "search", "eval")
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


def temp_sibling(path: str | os.PathLike, kind: str = "tmp", suffix: str = "") -> Path:
    """A new `.NAME.<pid>.<random>.<kind><suffix>` beside `path`, claimed (its sidecar written) before it exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.{kind}{suffix}")
    claim(tmp)
    return tmp


def claim(tmp: Path) -> Path:
    """Write the sidecar `<tmp>.flowmap` naming `tmp`: from now on a leftover `tmp` is flowmap's to remove."""
    side = tmp.with_name(tmp.name + CLAIM_SUFFIX)
    data = json.dumps({"flowmap_leftover": tmp.name, "pid": os.getpid()})
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    return side


def unclaim(tmp: Path) -> None:
    """Remove `tmp`'s claim (after `tmp` itself is gone or renamed into place)."""
    try:
        tmp.with_name(tmp.name + CLAIM_SUFFIX).unlink()
    except OSError:
        pass


def _claimed(tmp: Path) -> bool:
    """True when `tmp` has a sidecar claim (a plain file) that names it."""
    side = tmp.with_name(tmp.name + CLAIM_SUFFIX)
    try:
        if side.is_symlink() or not side.is_file() or side.stat().st_size > 4096:
            return False
        return json.loads(side.read_text()).get("flowmap_leftover") == tmp.name
    except (OSError, ValueError, AttributeError):
        return False


def clean_stale(directory: str | os.PathLike, name: str, by_name: bool = False) -> list[Path]:
    """Remove flowmap's leftovers `.NAME.<pid>.*.tmp|old|part` of killed runs in `directory` (dead pids only).

    A leftover is flowmap's when its claim (`<leftover>.flowmap`, see `temp_sibling`) names it; a name that merely
    looks like one is the user's and stays. `by_name` (for directories only flowmap writes, like its download
    cache) recognises leftovers by name alone.
    """
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        base = p.name[: -len(CLAIM_SUFFIX)] if p.name.endswith(CLAIM_SUFFIX) else p.name
        m = _STALE.match(base)
        if not m or m.group("name") != name or _pid_alive(int(m.group("pid"))):
            continue
        if p.name != base:  # an orphaned claim (its leftover already gone)
            if not p.with_name(base).exists() and not p.with_name(base).is_symlink() and _claimed(p.with_name(base)):
                p.unlink(missing_ok=True)
            continue
        if not by_name and not _claimed(p):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            unclaim(p)
            removed.append(p)
        except OSError:
            pass
    return removed


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_error(out, e: OSError, then: str = "") -> FlowmapError:
    """The one sentence for a failed write (disk full, file too large, permissions...); `then` adds a next step."""
    reason = e.strerror or str(e)
    if e.errno in DISK_FULL_ERRNOS:
        return FlowmapError(f"cannot write {out} ({reason}); free some disk space or choose another `out`{then}.")
    if e.errno == errno.ELOOP:
        return FlowmapError(
            f"cannot write {out}: it is a symbolic link, which flowmap never writes through; remove it."
        )
    return FlowmapError(f"cannot write {out} ({reason}); choose a writable `out` directory{then}.")


def _files_under(directory: Path) -> list[str]:
    """Relative posix paths of every file (and symlink) under `directory`, the marker excluded (links not followed)."""
    out = []
    for root, dirs, files in os.walk(directory):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, n).relative_to(directory).as_posix()
            if rel != MARKER_NAME:
                out.append(rel)
    return sorted(out)


def links_under(directory: str | os.PathLike) -> list[str]:
    """Relative paths of the symbolic links under `directory` (none followed)."""
    found = []
    for root, dirs, files in os.walk(directory):
        for n in files + dirs:
            if os.path.islink(os.path.join(root, n)):
                found.append(Path(root, n).relative_to(directory).as_posix())
    return sorted(found)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks, never through a symbolic link)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


_HASH_CACHE: dict[tuple, str] = {}


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, read once per process and cached by (resolved path, size, mtime) (resume identity)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_sha256(p)
    return _HASH_CACHE[key]


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


# ----------------------------------------------------------------------------------------------- output marker
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"output kind {kind!r} is not one of {KINDS}")


def mark_output(
    directory: str | os.PathLike,
    kind: str,
    files: list[str] | None = None,
    *,
    growing: list[str] = (),
    update: bool = False,
) -> Path:
    """Write the marker into `directory`: `files` (default every file now present) with their size and sha256.

    `growing` lists files flowmap keeps rewriting in place (metrics.jsonl): listed, with no hash. `update` keeps
    what an existing marker of the same kind lists and records the new files over it.
    """
    _check_kind(kind)
    directory = Path(directory)
    names = sorted(files) if files is not None else _files_under(directory)
    hashes, listed = {}, set()
    old = _read_marker(directory) if update else None
    if old is not None and old["kind"] == kind:
        listed = {str(f) for f in old["files"]}
        hashes = {k: v for k, v in (old.get("hashes") or {}).items() if k in listed}
    for name in names:
        p = directory / name
        if p.is_file() and not p.is_symlink():
            hashes[name] = _record(p)
            listed.add(name)
    for name in growing:
        listed.add(name)
        hashes.pop(name, None)
    data = {"kind": kind, "files": sorted(listed), "hashes": {k: hashes[k] for k in sorted(hashes)}}
    data["flowmap_version"] = __version__
    write_text_atomic(directory / MARKER_NAME, json.dumps(data, indent=1) + "\n")
    return directory / MARKER_NAME


def output_kind(directory: str | os.PathLike) -> str | None:
    """The kind recorded in a directory's marker, or None (no marker, unreadable marker)."""
    marker = _read_marker(Path(directory))
    return marker["kind"] if marker else None


def read_marker(directory: str | os.PathLike) -> dict | None:
    """A directory's marker as a dict (kind, files, hashes), or None when it has none or it is not readable."""
    return _read_marker(Path(directory))


def _read_marker(directory: Path) -> dict | None:
    path = directory / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("files"), list):
        return None
    if not isinstance(data.get("hashes", {}), dict):
        return None
    return data


def changed_files(directory: str | os.PathLike, names=None) -> list[str]:
    """Files under `directory` (or just `names` of them that exist) that are not flowmap's unchanged output.

    A file is flowmap's when the marker lists it, it is a plain file (not a link), and its size and sha256 are
    the recorded ones (files listed without a hash, which flowmap appends to, only need to be plain files).
    """
    directory = Path(directory)
    marker = _read_marker(directory) or {"files": [], "hashes": {}}
    listed = {str(f) for f in marker["files"]}
    hashes = marker.get("hashes") or {}
    if names is None:
        names = _files_under(directory)
    bad = []
    for name in names:
        p = directory / name
        if not p.exists() and not p.is_symlink():
            continue
        if p.is_symlink() or not p.is_file() or name not in listed:
            bad.append(name)
            continue
        rec = hashes.get(name)
        if rec is None:
            continue
        try:
            if not isinstance(rec, dict) or p.stat().st_size != rec.get("size") or file_sha256(p) != rec.get("sha256"):
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


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
    if marker is None:
        return False, "is not a flowmap output (or holds files flowmap did not write)"
    if marker["kind"] != kind:
        return False, f"is a flowmap {marker['kind']} output, not a {kind} output"
    listed = {str(f) for f in marker["files"]}
    extra = sorted(set(present) - listed)
    if extra:
        return False, f"holds files flowmap did not write ({', '.join(extra[:3])})"
    links = links_under(directory)
    if links:
        return False, f"holds symbolic links ({', '.join(links[:3])})"
    hashes = marker.get("hashes") or {}
    unhashed = sorted(f for f in present if f not in hashes)
    if unhashed and kind not in ("run", "search", "eval"):
        return False, f"holds files with no recorded hash ({', '.join(unhashed[:3])}; an older flowmap wrote them)"
    edited = changed_files(directory, present)
    if edited:
        return False, f"holds files changed since flowmap wrote them ({', '.join(edited[:3])})"
    return True, ""


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


def _refuse_cwd(out: Path, flag: str) -> None:
    """`--out .` (or any directory holding the working directory) is refused before any work."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return
    if _within(cwd, out.resolve()):
        raise FlowmapError(
            f"{flag} {out} is the current directory (or holds it); choose a new directory, e.g. {flag} flowmap-out."
        )


def check_output(
    out: str | os.PathLike,
    kind: str,
    *,
    force: bool = False,
    sources=(),
    flag: str = "`out`",
    force_flag: str | None = None,
) -> Path:
    """Fail now (one FlowmapError) if `out` may not be written or replaced; returns it as a Path.

    `sources` are what the command reads (local paths; other strings are ignored): an `out` that is, or holds,
    one of them is refused even with --force. `force` replaces a directory that is not ours; `force_flag` is the
    parameter that sets it, named in the refusal (None for commands that have no such option). `flag` and
    `force_flag` are parameter names in backticks (`` `out` ``), which the CLI prints as flags (vocabulary.for_cli).
    """
    _check_kind(kind)
    out = Path(out)
    if str(out).strip() == "":
        raise FlowmapError(f"{flag} is empty; pass an output directory.")
    if out.is_symlink():
        raise FlowmapError(f"{flag} {out} is a symbolic link; pass the real directory or another {flag}.")
    target = out.resolve()
    _refuse_sources(out, target, sources, flag)
    _refuse_cwd(out, flag)
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


def check_workdir(out: str | os.PathLike, kind: str, what: str, flag: str = "`out`", sources=()) -> Path:
    """Up-front check of a directory written in place and resumed (a fine-tune run, a search, an evaluation).

    It may be new, empty, or one of ours of the same kind (its marker says so, and its contents are ours to
    update); a file, a symbolic link, a directory holding a symbolic link (nothing is followed out of it), or a
    directory holding anything else (a user's folder, a model, samples) is refused in one line before any work,
    and nothing is changed.
    """
    _check_kind(kind)
    out = Path(out)
    _refuse_sources(out, out.resolve(), sources, flag)
    if out.is_symlink():
        raise FlowmapError(f"{flag} {out} is a symbolic link; pass the real directory or another {flag}.")
    _refuse_cwd(out, flag)
    if out.exists() and not out.is_dir():
        raise FlowmapError(f"{flag} {out} is a file; choose a directory for the {what}.")
    held = output_kind(out) if out.is_dir() and any(out.iterdir()) else kind
    if held != kind:
        held = f"a flowmap {held} output" if held else "files flowmap did not write"
        raise FlowmapError(
            f"{flag} {out} holds {held}, not a {what}; choose a new or empty directory (nothing was changed)."
        )
    links = links_under(out) if out.is_dir() else []
    if links:
        raise FlowmapError(
            f"{flag} {out} holds symbolic links ({', '.join(links[:3])}), which flowmap never writes through; "
            "remove them or choose a new directory (nothing was changed)."
        )
    return out


# ----------------------------------------------------------------------------------------------- locks
_HELD: dict[str, list] = {}  # lock path -> [fd, depth, created]: re-entrant within this process


@contextmanager
def output_lock(out: str | os.PathLike, flag: str = "`out`"):
    """Hold an exclusive lock on `out` (a `.NAME.flowmap-lock` beside it) while the block runs; refuse at once if
    another process holds it. Re-entrant within one process; the lock file is removed when released."""
    import fcntl

    out = Path(out).absolute()
    path = out.with_name(f".{out.name}{LOCK_SUFFIX}")
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    for _ in range(5):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError as e:
                raise write_error(path, e) from None
        except OSError as e:
            raise write_error(out, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FlowmapError(
                f"{flag} {out} is being written by another flowmap process (it holds {path}); wait for it to "
                f"finish or choose another {flag}."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed and re-created by a finishing run: lock the new one
    else:
        raise FlowmapError(f"cannot lock {path}; choose another {flag}.")
    _HELD[key] = [fd, 1, created]
    try:
        yield path
    finally:
        _HELD.pop(key, None)
        try:
            os.unlink(path)  # while still holding it: a waiting process re-checks the inode
        except OSError:
            pass
        os.close(fd)


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
    OSErrors (disk full, permissions) become one FlowmapError. The whole write holds `output_lock(out)`.
    """
    out = check_output(out, kind, force=force, sources=sources, force_flag=force_flag)
    with output_lock(out):
        parent = out.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(out.absolute(), "tmp")
            tmp.mkdir(mode=0o777 & ~current_umask())
        except OSError as e:
            raise write_error(out, e) from None
        aside = None
        try:
            try:
                yield tmp
                mark_output(tmp, kind)
                check_output(
                    out, kind, force=force, sources=sources, force_flag=force_flag
                )  # nothing changed meanwhile
                if out.exists():
                    aside = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
                    claim(aside)
                    os.rename(out, aside)
                try:
                    os.rename(tmp, out)
                except OSError:
                    if aside is not None:
                        os.rename(aside, out)
                        unclaim(aside)
                        aside = None
                    raise
                unclaim(tmp)
            except OSError as e:
                raise write_error(out, e) from None
        except BaseException:
            if aside is not None and aside.exists() and not out.exists():  # interrupted mid-swap: the old one goes back
                try:
                    os.rename(aside, out)
                except OSError:
                    pass
            if aside is not None and not aside.exists():
                unclaim(aside)
            if tmp.exists() and not (out.exists() and os.path.samefile(tmp, out)):
                shutil.rmtree(tmp, ignore_errors=True)
            unclaim(tmp)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            if not aside.exists():
                unclaim(aside)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary sibling path that replaces `path` only if the block succeeds (removed otherwise).

    `suffix` keeps writers that append an extension (np.savez adds `.npz`) from renaming the temporary file.
    A `path` that is a symbolic link is refused: nothing is written through a link.
    """
    path = Path(path)
    if path.is_symlink():
        raise FlowmapError(
            f"cannot write {path}: it is a symbolic link, which flowmap never writes through; remove it."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent, path.name)
        tmp = temp_sibling(path, "tmp", suffix)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
        unclaim(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically (temporary sibling, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def open_append(path: str | os.PathLike, truncate: bool = False):
    """Open a file flowmap appends to (metrics.jsonl) without following a symbolic link (one line when it is one)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    return os.fdopen(fd, "a")


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
