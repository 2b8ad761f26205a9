import pytest

from fastvllm.bench import LADDER, unavailable_methods
from fastvllm.bench.methods import parse_ids


def test_ladder_is_numbered_in_order_and_each_step_is_distinct():
    assert [m.id for m in LADDER] == [1, 2, 3, 4, 5, 6]
    assert len({(m.level, m.restore_args, m.fresh_compile_cache) for m in LADDER}) == len(LADDER)
    assert [m.id for m in LADDER if m.fresh_compile_cache] == [1]
    assert [m.id for m in LADDER if "overlap" in m.restore_args] == [6]


@pytest.mark.parametrize("text,ids", [("1-6", [1, 2, 3, 4, 5, 6]), ("1,3,5", [1, 3, 5]), ("4-6,1", [1, 4, 5, 6]),
                                      ("2", [2])])
def test_parse_ids(text, ids):
    assert parse_ids(text) == ids


@pytest.mark.parametrize("text", ["0-3", "7", "a", "", "1-x"])
def test_parse_ids_rejects(text):
    with pytest.raises(ValueError):
        parse_ids(text)


def test_step_seven_says_why_it_is_not_run():
    rows = unavailable_methods()
    assert rows and all(u.id == 7 and u.reason for u in rows)
