"""The benchmarks' timing schedule (`benchmarks.timing.alternating`)."""
from benchmarks.timing import alternating


def test_alternating_takes_turns_in_blocks_and_reverses_the_order():
  calls = []
  times = alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=5, block=2)
  assert "".join(calls) == "aabb" "bbaa" "ab"
  assert [len(t) for t in times.values()] == [5, 5] and all(s >= 0 for t in times.values() for s in t)
  calls.clear()
  alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
  assert "".join(calls) == "ab" "ba" "ab"
