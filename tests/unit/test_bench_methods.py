import pytest

from fastvllm.bench import LADDER, unavailable_methods
from fastvllm.bench.methods import BY_ID, parse_ids

ALL = list(range(1, 19))


def test_ladder_is_numbered_in_order_and_each_step_is_distinct():
    assert [m.id for m in LADDER] == ALL
    assert len({m.key for m in LADDER}) == len(LADDER)
    assert len({(m.level, m.restore_args, m.fresh_compile_cache, m.env) for m in LADDER}) == len(LADDER)
    assert [m.id for m in LADDER if m.fresh_compile_cache] == [1]
    assert [m.id for m in LADDER if not m.is_restore] == [1, 2]


def _opt(method, name):
    args = method.restore_args
    return args[args.index(name) + 1] if name in args else None


def test_steps_one_to_six_keep_their_meaning_and_are_pinned_to_the_copy_engine():
    """A default engine changing later must not change what 3-6 measure."""
    assert [(BY_ID[i].level, _opt(BY_ID[i], "--loader"), _opt(BY_ID[i], "--prefetch")) for i in (3, 4, 5, 6)] == [
        (0, None, "overlap"), (2, "vllm", "off"), (2, "fast", "off"), (2, "fast", "overlap")]
    assert [BY_ID[i].memory for i in (3, 4, 5, 6)] == ["copy"] * 4
    assert BY_ID[1].memory is None and BY_ID[2].memory is None


def test_every_restore_names_its_memory_engine_and_level_one_is_covered():
    restores = [m for m in LADDER if m.is_restore]
    assert all(m.memory in ("copy", "hugepage", "mmap", "lazy", "auto") for m in restores)
    level1 = {m.memory: m.id for m in restores if m.level == 1 and not m.env}
    assert level1 == {"copy": 8, "mmap": 9, "hugepage": 10, "lazy": 11, "auto": 13}
    # 18 is 10 with the huge-page readiness check off, and nothing else
    assert BY_ID[18].restore_args == BY_ID[10].restore_args and BY_ID[18].level == 1
    assert dict(BY_ID[18].env) == {"FASTVLLM_HUGEPAGE_CHECK": "off"}
    assert BY_ID[7].level == 0 and BY_ID[7].memory == "mmap"
    # 12 differs from 5 only in the engine
    assert BY_ID[12].level == 2 and BY_ID[12].memory == "mmap"
    assert [a for a in BY_ID[12].restore_args if a != "mmap"] == [a for a in BY_ID[5].restore_args if a != "copy"]
    # every level meets every engine (auto only at level 1, what a user gets)
    matrix = {(m.level, m.memory) for m in restores}
    assert {(lv, e) for lv in (0, 1, 2) for e in ("copy", "hugepage", "mmap", "lazy")} <= matrix
    # 16 and 17 differ from 5 only in the engine
    for i, engine in ((16, "hugepage"), (17, "lazy")):
        assert [a for a in BY_ID[i].restore_args if a != engine] == [a for a in BY_ID[5].restore_args if a != "copy"]
    # level 1 keeps its weights: no loader to choose
    assert all(_opt(m, "--loader") is None for m in restores if m.level in (0, 1))


@pytest.mark.parametrize("text,ids", [("1-6", [1, 2, 3, 4, 5, 6]), ("1,3,5", [1, 3, 5]), ("4-6,1", [1, 4, 5, 6]),
                                      ("2", [2]), ("all", ALL), (" ALL ", ALL), ("1-18", ALL),
                                      ("1,3,8,9", [1, 3, 8, 9])])
def test_parse_ids(text, ids):
    assert parse_ids(text) == ids


@pytest.mark.parametrize("text", ["0-3", "19", "a", "", "1-x", "17-19"])
def test_parse_ids_rejects(text):
    with pytest.raises(ValueError):
        parse_ids(text)


def test_the_step_after_the_ladder_is_vllms_own_snapshot_with_a_reason():
    rows = unavailable_methods()
    assert [(u.id, u.key) for u in rows] == [(19, "vllm-snapshot")]
    assert rows[0].reason
