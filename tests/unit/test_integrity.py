"""Image sealing and the unchanged-image proof the mmap engine relies on (real files)."""

from __future__ import annotations

import mmap
import os
import shutil

import pytest

from fastvllm import integrity
from fastvllm.errors import SnapshotInvalid


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "criu"
    d.mkdir()
    (d / "pages-1.img").write_bytes(os.urandom(3 * 4096))
    (d / "pstree.img").write_bytes(b"tree")
    return d


def test_seal_digests_makes_read_only_and_records_identity_after_chmod(images):
    record = integrity.seal(images)
    assert set(record) == {"pages-1.img", "pstree.img"}
    for name, entry in record.items():
        path = images / name
        assert path.stat().st_mode & 0o777 == 0o400
        assert entry["identity"] == integrity.identity(path)
        assert entry["xxh3_128"] == integrity.digest(path) and len(entry["xxh3_128"]) == 32


def test_untouched_images_pass_by_identity(images):
    record = integrity.seal(images)
    assert integrity.check_unchanged(images, record, why="test").by == "identity"


def test_a_faithful_copy_passes_by_digest(images, tmp_path):
    record = integrity.seal(images)
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    assert integrity.check_unchanged(copy, record, why="test").by == "digest"


def test_a_flipped_byte_is_refused_even_with_the_same_size_and_mtime(images):
    record = integrity.seal(images)
    victim = images / "pages-1.img"
    st = victim.stat()
    victim.chmod(0o600)
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still shows
    with pytest.raises(SnapshotInvalid, match="pages-1.img changed after the snapshot"):
        integrity.check_unchanged(images, record, why="--memory mmap")


def test_missing_image_and_missing_record_are_refused(images):
    record = integrity.seal(images)
    with pytest.raises(SnapshotInvalid, match="no image digests"):
        integrity.check_unchanged(images, None, why="--memory mmap")
    (images / "pstree.img").unlink()
    with pytest.raises(SnapshotInvalid, match="pstree.img is missing"):
        integrity.check_unchanged(images, record, why="--memory mmap")


def test_mapped_images_finds_a_process_that_maps_a_page_image(images):
    assert integrity.mapped_images([os.getpid()]) == {}
    with open(images / "pages-1.img", "rb") as fh:
        mapping = mmap.mmap(fh.fileno(), 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        try:
            found = integrity.mapped_images([os.getpid(), 999_999_999])
            assert found == {os.getpid(): str(images / "pages-1.img")}
        finally:
            mapping.close()
