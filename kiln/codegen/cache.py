"""The kernel cache: compiled libraries on disk and in this process, keyed by content.

In:  C++ source, the compiler that builds it (path, version, flags) and a build function.
Out: a loaded ``ctypes.CDLL``.

Layout under ``config.cache_dir`` (env ``KILN_CACHE_DIR``, default ``~/.cache/kiln``)::

    cpp/<k[:2]>/<k>.cpp            the source (kept: error messages and logs name it)
    cpp/<k[:2]>/<k>.<h[:16]>.so    the library, named by the sha256 ``h`` of its bytes
    cpp/<k[:2]>/<k>.json           metadata: the .so's file name, size and sha256, names, versions

    compilers/, decisions/           small JSON records (the compiler probe, the
                                     profitability decisions), same keying rules

``k`` is the sha256 of (source, compiler path and version, flags, kiln and torch
versions).  Only plain files: nothing is ever unpickled.  Every file is written under a
temporary name and moved into place with ``os.replace``; the ``.json`` is written last
and is the entry's one commit point, so two processes building the same source at once
are safe (both build, one metadata file wins, and it names a complete library).

A loaded entry is checked: the metadata parses, the library has the recorded size and
sha256, and ``dlopen`` succeeds; a corrupt entry (truncated or replaced .so, bad JSON,
dlopen failure) is deleted and rebuilt.  In this process, identical sources (12
identical layers) load once.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import tempfile
import uuid
from typing import Any, Callable, Optional

from kiln.codegen import config, metrics

_FORMAT = 1  # NOTE: bump when the layout or the metadata changes
_loaded: dict[tuple[str, str], ctypes.CDLL] = {}  # (cache dir, key) -> library


def cache_key(source: str, compiler: Any) -> str:
    """sha256 (hex) of everything the compiled library depends on."""
    import torch

    import kiln

    parts = {
        "format": _FORMAT,
        "source": source,
        "compiler": compiler.path,
        "compiler_version": compiler.version,
        "flags": list(compiler.flags),
        "kiln": kiln.__version__,
        "torch": torch.__version__,
        "host": host_id(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_host: Optional[str] = None


def host_id() -> str:
    """The machine's architecture and CPU model and features (for ``-march=native``
    libraries and timings: a cache folder shared by two machines keeps their entries apart)."""
    global _host
    if _host is None:
        import platform

        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                lines = [ln for ln in f.read(1 << 16).splitlines()
                         if ln.startswith(("model name", "flags", "Features", "CPU part"))]
            cpu = "\n".join(dict.fromkeys(lines))   # NOTE: one copy of each (one per core)
        except OSError:
            pass
        _host = hashlib.sha256(f"{platform.machine()}\n{platform.processor()}\n{cpu}".encode()).hexdigest()[:16]
    return _host


def entry_dir(key: str) -> str:
    """The folder of the entry ``key`` (under the current ``config.cache_dir``)."""
    return os.path.join(os.path.expanduser(config.cache_dir), "cpp", key[:2])


def paths(key: str) -> dict[str, str]:
    """``{"cpp": ..., "json": ...}``: the source and metadata files of entry ``key``."""
    d = entry_dir(key)
    return {"cpp": os.path.join(d, f"{key}.cpp"), "json": os.path.join(d, f"{key}.json")}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: str, data: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _valid_library(key: str) -> Optional[str]:
    """The library path of a complete, intact entry ``key``; None when absent or corrupt
    (a corrupt entry's metadata is deleted, so it is rebuilt)."""
    meta_path = paths(key)["json"]
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        _drop(key, None, "unreadable metadata")
        return None
    so_name = meta.get("so") if isinstance(meta, dict) else None
    if not isinstance(so_name, str) or os.sep in so_name or meta.get("key") != key:
        _drop(key, None, "malformed metadata")
        return None
    so_path = os.path.join(entry_dir(key), so_name)
    try:
        ok = os.path.getsize(so_path) == meta.get("size") and _sha256_file(so_path) == meta.get("sha256")
    except OSError:
        ok = False
    if not ok:
        _drop(key, so_path, "library missing or its hash does not match")
        return None
    return so_path


def _drop(key: str, so_path: Optional[str], why: str) -> None:
    from kiln.passes import should_log

    metrics.cache_corrupt_count += 1
    if should_log("codegen", "cache"):
        print(f"kiln.codegen cache: entry {key[:16]} is corrupt ({why}); rebuilding", file=sys.stderr)
    _unlink(paths(key)["json"])
    if so_path:
        _unlink(so_path)


def _build(key: str, source: str, name: str, compiler: Any,
           build: Callable[[Any, str, str], None]) -> str:
    d = entry_dir(key)
    os.makedirs(d, exist_ok=True)
    p = paths(key)
    _write_atomic(p["cpp"], source)
    tmp_so = os.path.join(d, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}.so")
    try:
        build(compiler, p["cpp"], tmp_so)
        sha = _sha256_file(tmp_so)
        so_path = os.path.join(d, f"{key}.{sha[:16]}.so")
        os.replace(tmp_so, so_path)
    except BaseException:
        _unlink(tmp_so)
        raise
    meta = {"format": _FORMAT, "key": key, "name": name, "so": os.path.basename(so_path),
            "size": os.path.getsize(so_path), "sha256": sha, "compiler": compiler.path,
            "compiler_version": compiler.version, "flags": list(compiler.flags)}
    _write_atomic(p["json"], json.dumps(meta, indent=1, sort_keys=True))
    return so_path


def load(source: str, *, name: str, compiler: Any, build: Callable[[Any, str, str], None]) -> ctypes.CDLL:
    """The library of ``source``: from this process, from disk, or built now.

    ``compiler`` has ``path``, ``version`` and ``flags``; ``build(compiler, src_path,
    out_path)`` compiles a source file into a shared library (it raises on failure).
    """
    key = cache_key(source, compiler)
    slot = (os.path.expanduser(config.cache_dir), key)
    lib = _loaded.get(slot)
    if lib is not None:
        metrics.cache_memory_hits += 1
        return lib
    so_path = _valid_library(key)
    if so_path is not None:
        try:
            lib = ctypes.CDLL(so_path)
            metrics.cache_disk_hits += 1
        except OSError:
            # NOTE: intact bytes that do not load (built for another machine, say): rebuild.
            _drop(key, so_path, "dlopen failed")
            lib = None
    if lib is None:
        lib = ctypes.CDLL(_build(key, source, name, compiler, build))
    _loaded[slot] = lib
    return lib


# ----------------------------------------------------------------------------- records
# NOTE: small JSON records beside the libraries (the compiler probe, profitability
# decisions): plain files under <cache_dir>/<kind>/<key[:2]>/<key>.json, written atomically.
# A record that does not parse is treated as absent and overwritten.


def record_key(parts: dict) -> str:
    """sha256 (hex) of ``parts`` (JSON-able) with the cache format and versions added."""
    import torch

    import kiln

    full = {"format": _FORMAT, "kiln": kiln.__version__, "torch": torch.__version__,
            "host": host_id(), **parts}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()


_fingerprint: Optional[str] = None


def kiln_fingerprint() -> str:
    """A hash of kiln's sources, every stage (a changed tracer or AOT gives other graphs the
    same code): records keyed with it are remade after any change to kiln (once per process)."""
    global _fingerprint
    if _fingerprint is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for d, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    with open(path, "rb") as fh:
                        h.update(os.path.relpath(path, root).encode() + b"\0" + fh.read())
        _fingerprint = h.hexdigest()
    return _fingerprint


def value_meta(x: Any) -> Any:
    """What a key records of a value: a tensor's sizes, strides, dtype, device and
    requires_grad; sequences item by item; scalars (SymInts as text) by value; else the type."""
    import torch

    if isinstance(x, torch.Tensor):
        return [str(tuple(x.shape)), str(x.stride()), str(x.dtype), str(x.device), x.requires_grad]
    if isinstance(x, (list, tuple)):
        return [value_meta(v) for v in x]
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(x)
    return repr(x) if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__


def _record_path(kind: str, key: str) -> str:
    return os.path.join(os.path.expanduser(config.cache_dir), kind, key[:2], f"{key}.json")


def read_record(kind: str, key: str) -> Optional[dict]:
    """The record ``key`` of ``kind`` ("compilers", "decisions"), or None."""
    try:
        with open(_record_path(kind, key)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def write_record(kind: str, key: str, data: dict) -> None:
    """Store ``data`` (JSON-able) as the record ``key``; an unwritable cache is ignored."""
    path = _record_path(kind, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, json.dumps({**data, "key": key}, indent=1, sort_keys=True))
    except OSError:
        pass


def clear_memory() -> None:
    """Forget the libraries loaded in this process (the next ``load`` reads the disk)."""
    _loaded.clear()


__all__ = ["cache_key", "entry_dir", "paths", "load", "clear_memory", "record_key",
           "read_record", "write_record", "kiln_fingerprint", "value_meta"]
