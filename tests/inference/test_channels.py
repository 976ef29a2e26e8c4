"""The manifest's channel rules: parsed with every problem named, and the choice of one series per channel."""

from __future__ import annotations

import pytest

from edge_runtime.errors import SeriesRefused
from edge_runtime.inference.channels import Channels, SeriesFacts, parse_channels

RULES = [
    {"name": "T1", "modality": "MR", "series_description": "^t1( |$)", "contrast": False},
    {"name": "T1c", "modality": "MR", "series_description": "t1.*(gd|post)|t1c", "contrast": True},
    {"name": "FLAIR", "modality": "MR", "series_description": "flair", "image_type": ["ORIGINAL"]},
]


def channels() -> Channels:
    problems: list[str] = []
    parsed = parse_channels(RULES, 3, ["MR"], problems)
    assert problems == [] and parsed is not None
    return parsed


def facts(series_id: int, description: str, *, contrast: bool = False, image_type: str = "ORIGINAL", frame: str = "1"):
    return SeriesFacts(series_id, f"h{series_id}", "MR", description, (image_type, "PRIMARY"), contrast, frame)


def test_parse_names_every_problem() -> None:
    problems: list[str] = []
    node = [
        {"name": "A", "modality": "CT", "colour": 1},
        {"name": "A", "series_description": "("},
        {"image_type": "ORIGINAL", "contrast": "yes"},
    ]
    assert parse_channels(node, 2, ["MR"], problems) is None
    text = "\n".join(problems)
    for expected in (
        "'channels[0]' has unknown key(s) colour",
        "'channels[0]'.modality is 'CT'; the package serves MR",
        "'channels[1]'.series_description is not a regular expression",
        "'channels[2]'.name must be a non-empty string",
        "'channels[2]'.image_type must be a list of strings",
        "'channels[2]'.contrast must be true or false",
        "'channels' has 3 item(s); the model takes 2 input channel(s)",
    ):
        assert expected in text
    assert parse_channels(None, 1, ["MR"], problems := []) is None and problems == []
    assert parse_channels([{"name": "only"}], 1, ["MR"], problems) is None and problems == []  # one series in


def test_choice_by_description_contrast_and_image_type() -> None:
    series = [
        facts(1, "FLAIR", image_type="DERIVED"),  # a reformat: not ORIGINAL
        facts(2, "T1 post Gd", contrast=True),
        facts(3, "t1 mprage"),
        facts(4, "flair 3d"),
        facts(5, "localizer"),
    ]
    choice = channels().choose(series)
    assert choice.complete
    assert {name: s.series_id for name, s in choice.chosen.items()} == {"T1": 3, "T1c": 2, "FLAIR": 4}
    assert not channels().is_candidate(series[4])


def test_missing_and_ambiguous_channels_are_named() -> None:
    rules = channels()
    missing = rules.choose([facts(1, "T1"), facts(2, "T1c", contrast=True)])
    assert missing.missing == ("FLAIR",)
    refused = missing.refusal(rules)
    assert refused.code == "channel-missing" and "channel FLAIR" in refused.detail
    two = rules.choose([facts(1, "T1"), facts(2, "T1c", contrast=True), facts(3, "FLAIR"), facts(4, "FLAIR ax")])
    refused = two.refusal(rules)
    assert refused.code == "channel-ambiguous" and refused.detail.startswith("channel FLAIR: 2 series match (h3, h4)")


def test_frame_of_reference_must_be_shared() -> None:
    rules = channels()
    choice = rules.choose([facts(1, "T1"), facts(2, "T1c", contrast=True), facts(3, "FLAIR", frame="2")])
    with pytest.raises(SeriesRefused, match="frame-of-reference-mismatch: channel FLAIR is not on channel T1's"):
        rules.check_frame_of_reference(choice)
