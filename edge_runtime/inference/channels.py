"""A model's input channels, each taken from its own series of one study (the manifest's ``"channels"``).

A model trained on several co-registered images (nnU-Net's ``channel_names``: BraTS T1, T1c, T2 and FLAIR, or
CT and PET) needs one series per channel, and a study usually holds more series than that (localizers, other
weightings, reformats). The manifest says how to recognise each channel's series::

    "channels": [
      {"name": "T1",    "modality": "MR", "series_description": "^t1$|t1w?[ _-]?(pre|native)", "contrast": false},
      {"name": "T1c",   "modality": "MR", "series_description": "t1c|t1.*(gd|post|ce)", "contrast": true},
      {"name": "T2",    "modality": "MR", "series_description": "^t2$|t2w?[ _-]?tse"},
      {"name": "FLAIR", "modality": "MR", "series_description": "flair", "image_type": ["ORIGINAL"]}
    ]

In model input order; the first channel's grid is the one the others are resampled onto and the one the SEG is
drawn on. Every rule given must hold: ``modality`` equal, ``series_description`` a regular expression searched
case-insensitively, ``image_type`` values all present in ImageType, ``contrast`` whether ContrastBolusAgent is
set. A series matched by no rule is not an input (a localizer, say); a channel matched by no series or by
several cannot be chosen, and the study is refused with the channel named, because guessing between two
candidate FLAIRs would give a segmentation nobody can trace. A package without ``"channels"`` has one input
series, as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import SeriesRefused

_KEYS = {"name", "modality", "series_description", "image_type", "contrast"}


@dataclass(frozen=True)
class SeriesFacts:
    """What the channel rules look at in one series (from its first instance), and its name for logs."""

    series_id: int
    key_hash: str
    modality: str
    description: str
    image_type: tuple[str, ...]
    contrast: bool
    frame_of_reference: str


@dataclass(frozen=True)
class ChannelRule:
    """How one input channel's series is recognised; None means the rule does not look at that attribute."""

    name: str
    modality: str | None = None
    series_description: re.Pattern[str] | None = None
    image_type: tuple[str, ...] = ()
    contrast: bool | None = None

    def matches(self, facts: SeriesFacts) -> bool:
        if self.modality is not None and facts.modality.upper() != self.modality:
            return False
        if self.series_description is not None and not self.series_description.search(facts.description):
            return False
        if not set(self.image_type) <= set(facts.image_type):
            return False
        return self.contrast is None or facts.contrast == self.contrast

    def describe(self) -> str:
        parts = [f"modality {self.modality}"] if self.modality else []
        if self.series_description is not None:
            parts.append(f"description /{self.series_description.pattern}/i")
        if self.image_type:
            parts.append(f"image type {'+'.join(self.image_type)}")
        if self.contrast is not None:
            parts.append("with contrast" if self.contrast else "without contrast")
        return ", ".join(parts) or "any series"


@dataclass(frozen=True)
class ChannelChoice:
    """The series chosen for each channel, or why a channel has none."""

    chosen: dict[str, SeriesFacts]
    missing: tuple[str, ...]
    #: channel -> the key hashes of the series that match it (more than one, or one claimed by another channel)
    ambiguous: dict[str, tuple[str, ...]]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.ambiguous

    def refusal(self, channels: Channels) -> SeriesRefused:
        """The reason this choice cannot be segmented, naming the channel (ambiguity first: it needs a person)."""
        if self.ambiguous:
            name, hashes = next(iter(self.ambiguous.items()))
            return SeriesRefused(
                "channel-ambiguous",
                f"channel {name}: {len(hashes)} series match ({', '.join(hashes)}); rules: "
                f"{channels.rule(name).describe()}",
            )
        name = self.missing[0]
        return SeriesRefused(
            "channel-missing", f"no series of the study for channel {name} ({channels.rule(name).describe()})"
        )


@dataclass(frozen=True)
class Channels:
    """The input channels in model order (at least two; a one-channel package has ``channels`` None)."""

    rules: tuple[ChannelRule, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def rule(self, name: str) -> ChannelRule:
        return next(r for r in self.rules if r.name == name)

    def is_candidate(self, facts: SeriesFacts) -> bool:
        """Whether some channel's rule matches the series (else it is not an input of the model)."""
        return any(r.matches(facts) for r in self.rules)

    def choose(self, series: Sequence[SeriesFacts]) -> ChannelChoice:
        """One series per channel where exactly one matches, and no series serves two channels."""
        matches = {r.name: [s for s in series if r.matches(s)] for r in self.rules}
        claims: dict[int, list[str]] = {}
        for name, found in matches.items():
            for s in found:
                claims.setdefault(s.series_id, []).append(name)
        chosen: dict[str, SeriesFacts] = {}
        ambiguous: dict[str, tuple[str, ...]] = {}
        for name, found in matches.items():
            if len(found) > 1 or (len(found) == 1 and len(claims[found[0].series_id]) > 1):
                ambiguous[name] = tuple(s.key_hash for s in found)
            elif found:
                chosen[name] = found[0]
        missing = tuple(name for name, found in matches.items() if not found)
        return ChannelChoice(chosen, missing, ambiguous)

    def check_frame_of_reference(self, choice: ChannelChoice) -> None:
        """Refuse channels that are not on the first channel's Frame of Reference: their patient coordinates
        are not the same space, so resampling one onto the other would pair unrelated voxels."""
        first = self.names[0]
        reference = choice.chosen[first].frame_of_reference
        for name in self.names[1:]:
            other = choice.chosen[name].frame_of_reference
            if not reference or other != reference:
                raise SeriesRefused(
                    "frame-of-reference-mismatch",
                    f"channel {name} is not on channel {first}'s Frame of Reference"
                    + ("" if reference else f" (channel {first} has none)"),
                )


def parse_channels(node: Any, input_channels: int, modalities: Sequence[str], problems: list[str]) -> Channels | None:
    """The manifest's ``"channels"`` (None when absent); appends every problem found to ``problems``.

    The rules must be as many as the model's ``input_channels``, with distinct names, and a rule's modality
    must be one the listener accepts (``series_filter.modalities``), or its series could never arrive."""
    if node is None:  # one series in (a model of several channels without rules gets it in every channel)
        return None
    if not isinstance(node, list) or not all(isinstance(item, dict) for item in node):
        problems.append("'channels' must be a list of objects, one per input channel in model order")
        return None
    before = len(problems)
    rules = [_rule(i, item, modalities, problems) for i, item in enumerate(node)]
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        problems.append(f"'channels' names must be distinct, got {names}")
    if len(rules) != input_channels:
        problems.append(f"'channels' has {len(rules)} item(s); the model takes {input_channels} input channel(s)")
    if len(problems) > before:
        return None
    return Channels(tuple(rules)) if len(rules) > 1 else None


def _rule(i: int, item: dict[str, Any], modalities: Sequence[str], problems: list[str]) -> ChannelRule:
    where = f"'channels[{i}]'"
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        problems.append(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.name must be a non-empty string")
        name = f"#{i}"
    modality = item.get("modality")
    if modality is not None and (not isinstance(modality, str) or modality.upper() not in modalities):
        problems.append(f"{where}.modality is {modality!r}; the package serves {', '.join(modalities)}")
        modality = None
    pattern = None
    text = item.get("series_description")
    if text is not None:
        try:
            pattern = re.compile(str(text), re.IGNORECASE)
        except re.error as exc:
            problems.append(f"{where}.series_description is not a regular expression: {exc}")
    image_type = item.get("image_type", [])
    if not isinstance(image_type, list) or not all(isinstance(v, str) for v in image_type):
        problems.append(f'{where}.image_type must be a list of strings such as ["ORIGINAL", "PRIMARY"]')
        image_type = []
    contrast = item.get("contrast")
    if contrast is not None and not isinstance(contrast, bool):
        problems.append(f"{where}.contrast must be true or false")
        contrast = None
    return ChannelRule(
        name=name,
        modality=modality.upper() if isinstance(modality, str) else None,
        series_description=pattern,
        image_type=tuple(v.upper() for v in image_type),
        contrast=contrast,
    )
