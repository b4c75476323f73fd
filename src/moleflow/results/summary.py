"""The `final` block of a results dict, for the jobs, which still build their results as dicts.

The summary itself (means of the last row, forgetting, routing accuracy, matrices R[t][j]) is
`moleflow.results.schema.summarize`, on typed steps; this is only the dict-level entry point.
"""
from __future__ import annotations

from moleflow.results import schema


def summarize(steps: list[dict]) -> dict:
    """`final` of results.json from its `steps` (as dicts)."""
    typed = [schema.Step.from_json(s, f"steps[{i}]") for i, s in enumerate(steps)]
    return schema.summarize(typed).to_json()
