"""The rollouts reader (``srpo_core.rollouts``): a line nested too deeply for the JSON parser is the library's error,
naming the file and the line."""

from __future__ import annotations

import pytest
from srpo_core_test_checks import raises  # tests/_checks.py

from srpo_core.rollouts import RolloutError, parse_lines


@pytest.mark.parametrize("depth", [10**5, 10**6])
def test_rollouts_deeply_nested_json_names_the_line(depth):
    lines = ['', "[" * depth]
    with raises(RolloutError, "x.jsonl:2", "nested too deeply"):
        parse_lines(lines, "x.jsonl")
