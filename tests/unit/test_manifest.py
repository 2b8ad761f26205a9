"""The snapshot directory is created privately, committed atomically with a manifest that
records every file's size, and rejected with one clear line whenever it is not usable."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from fastvllm import manifest
from fastvllm.errors import FastvllmError, SnapshotInvalid


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def _base_manifest() -> dict:
    return {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "model": "/models/tiny",
        "server": {"host": "127.0.0.1", "port": 8000, "endpoint": "http://127.0.0.1:8000"},
        "canary": {"prompt": "p", "max_tokens": 4, "completion": "abcd"},
        "tree": {"root_pid": 4321, "pids": [4321, 4322]},
        "external_files": [],
    }


@pytest.fixture
def snapshot_dir(tmp_path) -> Path:
    """A real committed snapshot: two CRIU images, one external file, a manifest."""
    out = tmp_path / "snap"
    tmp = manifest.prepare_target(out)
    (tmp / manifest.CRIU_DIR).mkdir()
    (tmp / manifest.CRIU_DIR / "pages-1.img").write_bytes(b"p" * 3000)
    (tmp / manifest.CRIU_DIR / "core-4321.img").write_bytes(b"c" * 123)
    (tmp / manifest.EXTERNAL_DIR).mkdir()
    (tmp / manifest.EXTERNAL_DIR / "0000-server.log").write_bytes(b"log line\n")
    manifest.commit(tmp, out, _base_manifest())
    return out


_DELETE = object()


def _rewrite(snapshot: Path, **changes) -> None:
    path = snapshot / manifest.MANIFEST
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _assert_one_line_invalid(snapshot: Path, *needles: str) -> str:
    with pytest.raises(SnapshotInvalid) as info:
        manifest.load(snapshot)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, repr(msg)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# --------------------------------------------------------------------------- prepare_target


def test_prepare_target_refuses_non_empty_dir_and_leaves_it_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "inner.bin").write_bytes(b"\x00\x01")
    before = _tree(out)
    with pytest.raises(FastvllmError, match="is not empty") as info:
        manifest.prepare_target(out)
    assert not isinstance(info.value, SnapshotInvalid)
    assert str(out) in str(info.value)
    assert _tree(out) == before
    assert not _partials(tmp_path)


def test_prepare_target_refuses_regular_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(FastvllmError, match="exists and is not a directory"):
        manifest.prepare_target(out)
    assert out.read_text() == "a file"
    assert not _partials(tmp_path)


def test_prepare_target_accepts_missing_dir(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    tmp = manifest.prepare_target(out)
    assert tmp.is_dir() and tmp.parent == out.parent
    assert not out.exists()  # nothing is written under the final name yet
    assert re.fullmatch(r"\.out\.partial-[0-9a-f]{8}", tmp.name), tmp.name
    assert _mode(tmp) == 0o700
    assert list(tmp.iterdir()) == []


def test_prepare_target_accepts_empty_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    tmp = manifest.prepare_target(out)
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
    assert _mode(tmp) == 0o700
    assert out.is_dir() and list(out.iterdir()) == []


def test_prepare_target_is_private_despite_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        tmp = manifest.prepare_target(tmp_path / "out")
    finally:
        os.umask(old)
    assert _mode(tmp) == 0o700


def test_prepare_target_twice_gives_distinct_temp_dirs(tmp_path):
    a = manifest.prepare_target(tmp_path / "out")
    b = manifest.prepare_target(tmp_path / "out")
    assert a != b and a.is_dir() and b.is_dir()


# --------------------------------------------------------------------------- commit


def test_commit_writes_manifest_and_renames_into_place(tmp_path):
    out = tmp_path / "snap"
    tmp = manifest.prepare_target(out)
    (tmp / "criu").mkdir()
    (tmp / "criu" / "pages-1.img").write_bytes(b"x" * 4096)
    (tmp / "criu" / "pstree.img").write_bytes(b"y" * 10)
    (tmp / "external").mkdir()
    (tmp / "external" / "0001-psm_abc").write_bytes(b"z" * 77)
    manifest.commit(tmp, out, _base_manifest())

    assert not tmp.exists()
    assert not _partials(tmp_path)
    assert out.is_dir()
    mpath = out / "manifest.json"
    assert _mode(mpath) == 0o600
    data = json.loads(mpath.read_text())
    assert data["files"] == {"criu/pages-1.img": 4096, "criu/pstree.img": 10, "external/0001-psm_abc": 77}
    assert data["image_bytes"] == 4106  # only criu/ counts
    assert data["model"] == "/models/tiny" and data["tree"]["pids"] == [4321, 4322]
    assert (out / "criu" / "pages-1.img").read_bytes() == b"x" * 4096


def test_commit_does_not_mutate_callers_dict(tmp_path):
    out = tmp_path / "snap"
    tmp = manifest.prepare_target(out)
    given = _base_manifest()
    manifest.commit(tmp, out, given)
    assert "files" not in given and "image_bytes" not in given


def test_commit_replaces_empty_target_dir(tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    tmp = manifest.prepare_target(out)
    (tmp / "criu").mkdir()
    (tmp / "criu" / "a.img").write_bytes(b"a" * 5)
    manifest.commit(tmp, out, _base_manifest())
    assert (out / "manifest.json").is_file()
    assert (out / "criu" / "a.img").read_bytes() == b"aaaaa"
    assert not _partials(tmp_path)
    assert manifest.load(out)["image_bytes"] == 5


# --------------------------------------------------------------------------- load


def test_load_valid_snapshot(snapshot_dir):
    data = manifest.load(snapshot_dir)
    assert data["format"] == "fastvllm-snapshot" and data["format_version"] == 2
    assert data["files"] == {"criu/core-4321.img": 123, "criu/pages-1.img": 3000, "external/0000-server.log": 9}
    assert data["image_bytes"] == 3123
    assert data["tree"] == {"root_pid": 4321, "pids": [4321, 4322]}


def test_load_relative_path(snapshot_dir, monkeypatch):
    monkeypatch.chdir(snapshot_dir.parent)
    assert manifest.load(Path(snapshot_dir.name))["image_bytes"] == 3123


def test_load_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _assert_one_line_invalid(f, "is not a directory")
    _assert_one_line_invalid(tmp_path / "missing", "is not a directory")


def test_load_without_manifest(tmp_path):
    (tmp_path / "criu").mkdir()
    _assert_one_line_invalid(tmp_path, "has no manifest.json", "not a fastvllm snapshot")


def test_load_partial_dir_is_not_a_snapshot(tmp_path):
    tmp = manifest.prepare_target(tmp_path / "snap")
    (tmp / "criu").mkdir()
    _assert_one_line_invalid(tmp, "has no manifest.json")


def test_load_corrupt_json(snapshot_dir):
    (snapshot_dir / "manifest.json").write_text('{"format": "fastvllm-snapshot", "files": {')
    _assert_one_line_invalid(snapshot_dir, "unreadable or corrupt", "JSONDecodeError")


def test_load_invalid_utf8(snapshot_dir):
    (snapshot_dir / "manifest.json").write_bytes(b"\xff\xfe{}\x80")
    _assert_one_line_invalid(snapshot_dir, "unreadable or corrupt")


def test_load_wrong_format(snapshot_dir):
    _rewrite(snapshot_dir, format="something-else")
    _assert_one_line_invalid(snapshot_dir, "is not a fastvllm manifest")


def test_load_json_that_is_not_an_object(snapshot_dir):
    (snapshot_dir / "manifest.json").write_text("[1, 2, 3]")
    _assert_one_line_invalid(snapshot_dir, "is not a fastvllm manifest")


def test_load_wrong_format_version(snapshot_dir):
    _rewrite(snapshot_dir, format_version=1)  # dumped with a listening socket and dev endpoints
    _assert_one_line_invalid(snapshot_dir, "snapshot format 1 is not supported", "reads 2")
    _rewrite(snapshot_dir, format_version="2")
    _assert_one_line_invalid(snapshot_dir, "is not supported")


def test_load_missing_required_keys(snapshot_dir):
    _rewrite(snapshot_dir, canary=_DELETE, tree=_DELETE)
    _assert_one_line_invalid(snapshot_dir, "lacks canary, tree;")


def test_load_recorded_file_missing(snapshot_dir):
    (snapshot_dir / "criu" / "pages-1.img").unlink()
    _assert_one_line_invalid(snapshot_dir, "criu/pages-1.img is missing")


def test_load_recorded_file_truncated(snapshot_dir):
    with open(snapshot_dir / "criu" / "pages-1.img", "r+b") as fh:
        fh.truncate(1000)
    _assert_one_line_invalid(snapshot_dir, "criu/pages-1.img is 1000 bytes, manifest says 3000")


def test_load_recorded_file_grown(snapshot_dir):
    with open(snapshot_dir / "external" / "0000-server.log", "ab") as fh:
        fh.write(b"more\n")
    _assert_one_line_invalid(snapshot_dir, "external/0000-server.log is 14 bytes, manifest says 9")


def test_load_files_of_wrong_type_is_invalid(snapshot_dir):
    _rewrite(snapshot_dir, files=None)
    _assert_one_line_invalid(snapshot_dir)


# --------------------------------------------------------------------------- discard


def test_discard_removes_partial_dir(tmp_path):
    tmp = manifest.prepare_target(tmp_path / "x")
    (tmp / "criu").mkdir()
    (tmp / "criu" / "pages.img").write_bytes(b"1" * 100)
    assert tmp.name.startswith(".x.partial-")
    manifest.discard(tmp)
    assert not tmp.exists()


def test_discard_refuses_normal_dirs(tmp_path):
    normal = tmp_path / "x"
    normal.mkdir()
    (normal / "data").write_text("keep")
    no_dot = tmp_path / "x.partial-abcd"
    no_dot.mkdir()
    (no_dot / "data").write_text("keep")
    hidden = tmp_path / ".x"
    hidden.mkdir()
    (hidden / "data").write_text("keep")
    for path in (normal, no_dot, hidden):
        manifest.discard(path)
        assert (path / "data").read_text() == "keep", path


def test_discard_missing_dir_is_harmless(tmp_path):
    manifest.discard(tmp_path / ".x.partial-00000000")
