"""The one bounded cache every layer uses."""

from rescue.lru import LRU


def test_entries_beyond_capacity_fall_out_least_recently_used_first():
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1          # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and list(cache) == ["a", "c"]


def test_byte_weighted_capacity_and_eviction_callback():
    closed = []
    cache: LRU[int, bytes] = LRU(10, weight=len, on_evict=lambda k, v: closed.append(k))
    cache.put(1, b"x" * 4)
    cache.put(2, b"x" * 4)
    cache.put(3, b"x" * 4)               # 12 bytes > 10: the oldest goes
    assert closed == [1] and cache.used == 8
    assert cache.pop(2) == b"x" * 4 and closed == [1] and cache.used == 4   # pop is not an eviction


def test_a_cached_none_is_not_loaded_again():
    loads = []
    cache: LRU[str, None] = LRU(4)
    for _ in range(3):
        assert cache.get("k", lambda: loads.append(1)) is None
    assert loads == [1]


def test_one_oversized_entry_is_kept_rather_than_nothing():
    cache: LRU[int, bytes] = LRU(4, weight=len)
    cache.put(1, b"123456")
    assert cache.peek(1) == b"123456"

