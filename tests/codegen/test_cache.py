"""kiln.codegen.cache: compiled kernels as plain files keyed by content, loaded once per
process, shared between processes, and rebuilt when an entry is corrupt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kiln.codegen import cache, metrics
from kiln.codegen.cpp import build

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _source(tag: str) -> str:
    return f'// {tag}\nextern "C" long long kiln_cache_fn(long long x) {{ return 2 * x + {len(tag)}; }}\n'


def _entry(key: str) -> tuple[dict, str]:
    p = cache.paths(key)
    with open(p["json"]) as f:
        meta = json.load(f)
    return meta, os.path.join(cache.entry_dir(key), meta["so"])


def _key(src: str) -> str:
    return cache.cache_key(src, build.compiler())


def test_identical_sources_compile_and_load_once(tmp_cache):
    src = _source("twelve-layers")
    libs = [build.load_library(src, name=f"layer{i}") for i in range(12)]
    assert all(lib is libs[0] for lib in libs)
    assert metrics.cpp_compile_count == 1 and metrics.cache_memory_hits == 11
    assert libs[0].kiln_cache_fn(5) == 10 + len("twelve-layers")


def test_entry_is_plain_files_with_the_library_hash(tmp_cache):
    src = _source("plain-files")
    build.load_library(src, name="plain")
    files = [p for p in tmp_cache.rglob("*") if p.is_file()]
    assert sorted(p.suffix for p in files) == [".cpp", ".json", ".so"]
    key = _key(src)
    meta, so = _entry(key)
    assert open(cache.paths(key)["cpp"]).read() == src
    assert meta["key"] == key and meta["name"] == "plain" and meta["size"] == os.path.getsize(so)
    import hashlib

    assert meta["sha256"] == hashlib.sha256(open(so, "rb").read()).hexdigest()


def test_key_depends_on_source_compiler_and_flags():
    cc = build.compiler()
    base = cache.cache_key("a", cc)
    assert cache.cache_key("a", cc) == base
    assert cache.cache_key("b", cc) != base
    other_flags = type(cc)(cc.path, cc.version, cc.flags + ("-DX",), cc.openmp)
    other_version = type(cc)(cc.path, cc.version + " (patched)", cc.flags, cc.openmp)
    assert cache.cache_key("a", other_flags) != base
    assert cache.cache_key("a", other_version) != base


def _replace_library(so: str, data: bytes) -> None:
    # NOTE: replaced, not written in place: this process may have the old file mapped.
    tmp = so + ".test-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, so)


@pytest.mark.parametrize("damage", ["truncated", "appended", "bad_json", "missing_so"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_cache, damage):
    src = _source(f"corrupt-{damage}")
    build.load_library(src, name="c")
    key = _key(src)
    meta, so = _entry(key)
    data = open(so, "rb").read()
    if damage == "truncated":
        _replace_library(so, data[: len(data) // 3])
    elif damage == "appended":
        _replace_library(so, data + b"\0junk")
    elif damage == "bad_json":
        with open(cache.paths(key)["json"], "w") as f:
            f.write('{"key": ')
    else:
        os.unlink(so)
    cache.clear_memory()
    lib = build.load_library(src, name="c")
    assert lib.kiln_cache_fn(1) == 2 + len(f"corrupt-{damage}")
    assert metrics.cache_corrupt_count == 1 and metrics.cpp_compile_count == 2
    _, so2 = _entry(key)
    assert open(so2, "rb").read() != b"" and os.path.getsize(so2) == _entry(key)[0]["size"]


def test_library_that_does_not_load_is_rebuilt(tmp_cache):
    src = _source("dlopen-fails")
    build.load_library(src, name="d")
    key = _key(src)
    meta, so = _entry(key)
    junk = b"not an ELF file"
    import hashlib

    bad = os.path.join(os.path.dirname(so), f"{key}.junk.so")
    with open(bad, "wb") as f:
        f.write(junk)
    meta.update(so=os.path.basename(bad), size=len(junk), sha256=hashlib.sha256(junk).hexdigest())
    with open(cache.paths(key)["json"], "w") as f:
        json.dump(meta, f)
    cache.clear_memory()
    assert build.load_library(src, name="d").kiln_cache_fn(0) == len("dlopen-fails")
    assert metrics.cache_corrupt_count == 1 and metrics.cpp_compile_count == 2
    assert not os.path.exists(bad)


_CHILD = textwrap.dedent("""
    import json, sys
    from kiln.codegen import metrics
    from kiln.codegen.cpp.build import load_library
    lib = load_library(sys.argv[1], name="child")
    print(json.dumps({"value": lib.kiln_cache_fn(3), **metrics.snapshot()}))
""")


def _child(src: str, cache_dir) -> subprocess.Popen:
    env = dict(os.environ, KILN_CACHE_DIR=str(cache_dir), PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", _CHILD, src], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_instead_of_compiling(tmp_cache):
    src = _source("second-process")
    build.load_library(src, name="parent")
    assert metrics.cpp_compile_count == 1
    got = _result(_child(src, tmp_cache))
    assert got["value"] == 6 + len("second-process")
    assert got["cpp_compile_count"] == 0 and got["cache_disk_hits"] == 1


def test_two_processes_compiling_at_once_are_safe(tmp_cache):
    src = _source("race")
    procs = [_child(src, tmp_cache) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert all(r["value"] == 6 + len("race") for r in results)
    # NOTE: whichever metadata file won names a complete library; this process loads it.
    build.load_library(src, name="after")
    assert metrics.cpp_compile_count == 0 and metrics.cache_disk_hits == 1
    assert not [p for p in tmp_cache.rglob(".tmp-*")]
