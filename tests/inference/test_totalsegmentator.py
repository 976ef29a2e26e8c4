"""The manifest's ``"totalsegmentator"`` section and the merge, without torch (the export side is tested in
``tests/export/test_totalsegmentator.py``)."""

from __future__ import annotations

import numpy as np

from edge_runtime.inference.totalsegmentator.pipeline import merge_parts
from edge_runtime.inference.totalsegmentator.settings import parse_totalsegmentator

SECTION = {
    "task": "total", "resample_mm": 1.5,
    "parts": [{"task_id": 291, "part": "class_map_part_organs", "dataset": "Dataset291_x", "classes": 3,
               "labels": [0, 1, 2]},
              {"task_id": 292, "part": "class_map_part_vertebrae", "dataset": "Dataset292_x", "classes": 2,
               "labels": [0, 3]}],
}


def test_a_section_is_read_and_its_output_channels_are_every_parts_classes() -> None:
    problems: list[str] = []
    settings = parse_totalsegmentator(SECTION, problems)
    assert problems == [] and settings is not None
    assert settings.output_channels == 5 and [p.labels for p in settings.parts] == [(0, 1, 2), (0, 3)]
    assert parse_totalsegmentator(settings.to_dict(), []) == settings
    assert parse_totalsegmentator(None, problems) is None and problems == []


def test_every_problem_of_a_section_is_named() -> None:
    bad = {**SECTION, "orientation": "LPS", "resample_order": 7,
           "parts": [{"task_id": 291, "part": "organs", "classes": 3, "labels": [1, 2, 3]}]}
    problems: list[str] = []
    assert parse_totalsegmentator(bad, problems) is None
    assert len(problems) == 3
    assert any("orientation" in p for p in problems) and any("resample_order" in p for p in problems)
    assert any("parts[0]" in p for p in problems)


def test_a_later_part_overwrites_an_earlier_one_only_where_it_found_something() -> None:
    settings = parse_totalsegmentator(SECTION, [])
    assert settings is not None
    organs = np.array([[0, 1, 2, 2]], dtype=np.uint8)
    vertebrae = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    assert merge_parts([organs, vertebrae], settings.parts).tolist() == [[3, 1, 3, 2]]
