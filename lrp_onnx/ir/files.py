"""Files: atomic writes that honour the umask and leave no temporary behind (also on SIGTERM/SIGINT),
output paths checked before any work, and external weights that never lead out of a model's folder.

External data follows onnxruntime's rule: a tensor's `location` is a relative path that stays inside
the model's folder after symlinks are resolved. A converted model's weights are written (reflinked or
copied, never hard-linked) only inside its output folder."""
from __future__ import annotations

import contextlib
import filecmp
import os
import secrets
import shutil
import signal
import tempfile
import threading

import onnx
from onnx import TensorProto

from ..errors import LRPError

# -- temporaries removed on SIGTERM / SIGINT ----------------------------------------------------------
_TEMPORARIES: set[str] = set()


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that every `finally` runs (temporaries are removed)."""


def _remove_temporaries() -> None:
    for path in list(_TEMPORARIES):
        with contextlib.suppress(OSError):
            os.unlink(path)
        _TEMPORARIES.discard(path)


def _on_sigterm(signum, frame):
    _remove_temporaries()
    raise Terminated(f"terminated by signal {signum}")


def install_signal_cleanup():
    """SIGTERM removes the temporaries and raises Terminated (SIGINT raises KeyboardInterrupt, and the
    writers below remove their temporaries on any exception). Main thread only. Returns the previous
    handler (for restore_signal_handler), or None."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _on_sigterm)
    return None


def restore_signal_handler(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


class _Temporary:
    """A new private file in `directory`, published under its final name by `publish` or removed.

    Where the file system has unnamed files (Linux O_TMPFILE) it has no name until `publish` links it
    in, so a process killed with SIGKILL leaves nothing behind. Elsewhere, or when a name is needed
    (`named=True`: writers that take a path), it is `.lrp-<pid>-*<suffix>`, removed on any exception
    and on SIGTERM, and swept by a later write into the same folder once process <pid> is dead."""

    def __init__(self, directory: str, suffix: str, named: bool = False):
        self.directory, self.suffix, self.path, self.fd = directory, suffix, None, None
        sweep_dead_temporaries(directory)
        if not named and _UNNAMED_FILES:
            with contextlib.suppress(OSError):  # not every file system has them (EOPNOTSUPP, EISDIR)
                self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        if self.fd is None:
            self.fd, self.path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", suffix=suffix, dir=directory)
            _TEMPORARIES.add(self.path)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]

    def publish(self, path: str) -> None:
        """Give the file the mode a plain open() would (0666 & ~umask) and put it at `path` (atomically)."""
        os.fchmod(self.fd, 0o666 & ~_umask())
        if self.path is None:  # link the unnamed file in under a private name, then rename it over `path`
            name = os.path.join(self.directory, f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{self.suffix}")
            _TEMPORARIES.add(name)
            self.path = name
            _link_unnamed(self.fd, name)
        os.replace(self.path, path)
        _TEMPORARIES.discard(self.path)
        self.path = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.path is not None:
            _TEMPORARIES.discard(self.path)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


_PREFIX = ".lrp-"
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def _linkat():
    """libc's linkat, or None. os.link cannot name an unnamed file: it does not follow /proc/self/fd/N."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).linkat
    except (ImportError, OSError, AttributeError):
        return None


_LINKAT = _linkat() if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd") else None
_UNNAMED_FILES = _LINKAT is not None


def _link_unnamed(fd: int, name: str) -> None:
    """Give the unnamed file `fd` the name `name` (linkat with AT_SYMLINK_FOLLOW: no privilege needed)."""
    import ctypes
    if _LINKAT(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(name), _AT_SYMLINK_FOLLOW) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), name)


@contextlib.contextmanager
def _temporary(directory: str, suffix: str, named: bool = False):
    """A `_Temporary` in `directory`, closed (and removed unless published) on leaving the block."""
    temporary = _Temporary(directory, suffix, named)
    try:
        yield temporary
    finally:
        temporary.close()


def sweep_dead_temporaries(directory: str) -> None:
    """Remove the named temporaries `.lrp-<pid>-*` in `directory` whose writing process is gone
    (killed before it could clean up). Only this user's files; those of live processes are kept."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            pid = entry.name[len(_PREFIX):].split("-", 1)[0]
            if not entry.name.startswith(_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid() \
                        and not _alive(int(pid)):
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path, *, inputs=(), what: str = "output") -> str:
    """The absolute output path, refused before any work when it is a directory, is one of the
    `inputs` (same file, also through symlinks or hard links), or its folder is missing or unwritable."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise LRPError(f"{path}: the {what} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise LRPError(f"{path}: the {what} directory does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LRPError(f"{path}: the {what} directory is not writable")
    for source in inputs:
        if source is None:
            continue
        source = os.fspath(source)
        same = os.path.realpath(source) == os.path.realpath(path)
        if not same and os.path.exists(path) and os.path.exists(source):
            with contextlib.suppress(OSError):
                same = os.path.samefile(source, path)
        if same:
            raise LRPError(f"{path}: the {what} is the input file {source}; write to another path")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise LRPError(f"{path}: the {what} exists and is not a regular file")
    return path


def write_atomically(path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a private temporary in the same folder, then a rename)."""
    path = check_output_file(path)
    with _temporary(os.path.dirname(path), ".partial") as temporary:
        temporary.write(data)
        temporary.publish(path)


# -- external data ---------------------------------------------------------------------------------
def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers, node attributes, also inside subgraphs."""
    def graph_tensors(g):
        yield from g.initializer
        yield from (s.values for s in g.sparse_initializer)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from graph_tensors(sub)
    yield from graph_tensors(model.graph)


def external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if not entries.get("location"):
                raise LRPError(f"tensor '{tensor.name}': external data without a location")
            locations.add(entries["location"])
    return locations


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _plain_relative(location: str) -> bool:
    """A relative path without '..' components, drive or NUL."""
    if not location or "\0" in location or os.path.isabs(location) or location.startswith(("/", "\\")):
        return False
    parts = location.replace("\\", "/").split("/")
    return ":" not in parts[0] and ".." not in parts


def check_external_data(model: onnx.ModelProto, base_dir: str | None, label: str, need_files: bool = True) -> None:
    """Every external `location` is a relative path inside the model's folder after resolving symlinks
    (onnxruntime's rule), and (need_files) names an existing regular file. Named in the error otherwise."""
    locations = external_locations(model)
    if not locations:
        return
    for location in sorted(locations):
        if base_dir is None:  # an in-memory model: its locations are read relative to where it is written
            if not _plain_relative(location):
                raise LRPError(f"{label}: external data location '{location}' is not a plain relative path")
            continue
        src = os.path.join(base_dir, location)
        if not _plain_relative(location) or not _inside(src, base_dir):
            raise LRPError(f"{label}: external data location '{location}' leads outside the model's folder "
                           f"{base_dir}; refused (onnxruntime refuses it as well)")
        if need_files and not os.path.isfile(src):
            raise LRPError(f"{src}: external weight file of the model is missing")


def save_model(model: onnx.ModelProto, path, base_dir: str | None) -> None:
    """Write atomically. External weights keep their file: in the source folder it is simply referenced;
    elsewhere it is reflinked or copied beside the output (never hard-linked), because onnxruntime
    refuses external data outside the model's folder. Weights are never parsed. Nothing is
    written outside the output's folder; on failure nothing new is left there either."""
    path = check_output_file(path)
    out_dir = os.path.dirname(path)
    placed: list[str] = []
    try:
        with _temporary(out_dir, ".onnx") as temporary:
            temporary.write(model.SerializeToString())
            locations = external_locations(model)
            if locations:
                check_external_data(model, base_dir, path)
                if base_dir is not None and os.path.realpath(base_dir) != os.path.realpath(out_dir):
                    for location in sorted(locations):
                        if _place_external_file(os.path.join(base_dir, location), out_dir, location):
                            placed.append(os.path.join(out_dir, location))
                for location in locations:
                    if os.path.realpath(os.path.join(out_dir, location)) == os.path.realpath(path):
                        raise LRPError(f"{path}: the output would overwrite the model's weight file {location}")
            temporary.publish(path)
    except BaseException:
        for p in placed:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise


def _place_external_file(src: str, out_dir: str, location: str) -> bool:
    """Give out_dir/location its own copy of the weight file `src` (a reflink where the file system
    has them, else a copy); False if an equal file is there already. Never a hard link: onnx.load
    refuses a weight file with several links ("hardlink attack"), the user's original included; a
    hard link left by an earlier version is replaced by a copy, which mends the original too.
    `src` lies inside the model's folder (check_external_data); its real path is read, so a symlink
    is never followed out of the folder. The destination must stay inside `out_dir` too."""
    real_src = os.path.realpath(src)
    dst = os.path.join(out_dir, location)
    if not _plain_relative(location) or not _inside(dst, out_dir):
        raise LRPError(f"{dst}: external data location '{location}' would lead outside the output folder {out_dir}")
    if os.path.lexists(dst):
        if os.path.islink(dst) or not os.path.isfile(dst):
            raise LRPError(f"{dst} exists and is not a regular file; write the converted model to another folder")
        if not os.path.samefile(real_src, dst):
            if filecmp.cmp(real_src, dst, shallow=False):
                return False
            raise LRPError(f"{dst} exists and differs from the model's weights {src}; "
                           f"write the converted model to another folder")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):  # sub-folders of the output folder only (location has no '..')
        os.makedirs(parent, exist_ok=True)
        if not _inside(parent, out_dir):
            raise LRPError(f"{dst}: the weights' folder leads outside the output folder {out_dir}")
    with _temporary(parent, ".data") as temporary, open(real_src, "rb") as source:
        _clone(source.fileno(), temporary.fd)
        temporary.publish(dst)
    return True


_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def _clone(src_fd: int, dst_fd: int) -> None:
    """Copy the file `src_fd` into the empty file `dst_fd`: a reflink (copy-on-write, no data copied)
    where the file system has them (btrfs, XFS, …), else an in-kernel copy, else a plain one."""
    with contextlib.suppress(OSError, ImportError):
        import fcntl
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    size = os.fstat(src_fd).st_size
    done = 0
    with contextlib.suppress(OSError, AttributeError):
        while done < size:
            n = os.copy_file_range(src_fd, dst_fd, size - done, done, done)
            if n == 0:
                break
            done += n
    if done < size:
        with os.fdopen(os.dup(src_fd), "rb") as source, os.fdopen(os.dup(dst_fd), "r+b") as target:
            source.seek(done)
            target.seek(done)
            shutil.copyfileobj(source, target, 1 << 24)


def check_convert_paths(model: onnx.ModelProto, model_path, base_dir: str | None, output_path) -> None:
    """Before any work: the input's external data is safe, and the output is a writable file that is
    neither the input model nor one of its weight files."""
    label = os.fspath(model_path) if model_path is not None else "<in-memory model>"
    check_external_data(model, base_dir, label, need_files=output_path is not None)
    if output_path is None:
        return
    inputs = [model_path] if model_path is not None else []
    if base_dir is not None:
        inputs += [os.path.join(base_dir, loc) for loc in external_locations(model)]
    check_output_file(output_path, inputs=inputs)
