"""proxy/base/memo.py: the one bounded memo and its one overflow policy (full: emptied, then the new key)."""

from __future__ import annotations

import pytest

from proxy.base.memo import Memo


def lookup(memo: Memo[str, str], key: str) -> str:
    """How the package looks a memo up."""
    value = memo.get(key)
    return value if value is not None else memo.make_for(key)


def counted(bound: int) -> tuple[Memo[str, str], list[str]]:
    made: list[str] = []

    def make(key: str) -> str:
        made.append(key)
        return key.upper()

    return Memo(bound, make), made


def test_a_key_is_computed_once_while_the_memo_holds_it() -> None:
    memo, made = counted(4)
    assert [lookup(memo, "a"), lookup(memo, "a"), lookup(memo, "b"), lookup(memo, "a")] == ["A", "A", "B", "A"]
    assert made == ["a", "b"]


def test_never_more_than_bound_entries_whatever_the_keys() -> None:
    memo, made = counted(8)
    for i in range(10_000):  # a flood of distinct keys (names and tokens are the client's choice)
        assert lookup(memo, f"k{i}") == f"K{i}"
        assert len(memo) <= 8
    assert len(made) == 10_000


def test_the_key_that_would_exceed_the_bound_empties_it_first() -> None:
    memo, made = counted(3)
    for key in "abc":
        lookup(memo, key)
    assert len(memo) == 3 and all(key in memo for key in "abc")
    lookup(memo, "d")  # a fourth key: everything goes, then d is kept
    assert ("d" in memo, len(memo)) == (True, 1)
    # The usual keys are computed once more after a clear, then held again.
    lookup(memo, "a")
    lookup(memo, "a")
    assert made == ["a", "b", "c", "d", "a"]


def test_a_flood_cannot_lock_the_usual_keys_out() -> None:
    # The policy's reason: a memo that stopped adding when full would compute "usual" on every
    # lookup after a flood; this one holds it again after one computation.
    memo, made = counted(16)
    for i in range(100):
        lookup(memo, f"junk{i}")
    lookup(memo, "usual")
    before = made.count("usual")
    for _ in range(5):
        lookup(memo, "usual")
    assert made.count("usual") == before == 1


def test_a_key_held_already_never_clears_a_full_memo() -> None:
    memo, _ = counted(2)
    lookup(memo, "a")
    lookup(memo, "b")
    memo.remember("a", "again")
    assert (memo.get("a"), memo.get("b"), len(memo)) == ("again", "B", 2)


def test_remember_keeps_to_the_same_bound_and_policy() -> None:
    memo: Memo[int, str] = Memo(2)
    assert memo.get(1) is None
    assert memo.remember(1, "one") == "one" and memo.remember(2, "two") == "two"
    memo.remember(3, "three")
    assert (memo.get(3), len(memo)) == ("three", 1)
    assert memo.get(4) is None and 4 not in memo


def test_a_value_whose_computation_fails_is_not_kept() -> None:
    def make(key: str) -> int:
        return int(key)

    memo: Memo[str, int] = Memo(4, make)
    with pytest.raises(ValueError):
        memo.make_for("not a number")
    assert "not a number" not in memo
    assert memo.make_for("7") == 7 and memo.get("7") == 7 and len(memo) == 1


def test_bound_zero_keeps_nothing() -> None:
    memo, made = counted(0)
    assert lookup(memo, "a") == "A" and lookup(memo, "a") == "A"
    assert len(memo) == 0 and made == ["a", "a"]
    assert memo.remember("b", "B") == "B" and len(memo) == 0


def test_the_lookup_stays_bound_to_the_memo_across_clears() -> None:
    # `get` is the dict's own method, taken once: a clear must empty that dict, not replace it.
    memo, _ = counted(1)
    get = memo.get
    lookup(memo, "a")
    lookup(memo, "b")
    assert get("a") is None and get("b") == "B"
