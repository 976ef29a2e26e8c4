"""The manifest's ``"channels"`` for an nnU-Net model of several input channels, from dataset.json's
``channel_names``.

nnU-Net names each input channel (``{"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}``, ``{"0": "CT", "1": "PET"}``)
but says nothing of which series of a study gives it; the runtime needs that rule
(:mod:`edge_runtime.inference.channels`). The defaults here read the usual names: ``CT`` is the study's CT,
``PET``/``PT`` its PET, ``MR``/``MRI`` its MR series; the MR weightings are told apart by the series description
(``T1`` without a contrast word, ``T1c``/``T1ce``/``T1Gd`` with one, ``T2`` that is not a FLAIR, ``FLAIR``,
``ADC``, ``DWI``). A name these do not cover is looked for in the series description as it is written. The
defaults are a starting point for a site's own naming, not a guarantee: when two series of a study match one
channel the runtime refuses the study and names the channel, and ``--channels FILE`` replaces the rules (the
manifest's ``"channels"`` format). A single-channel model gets no ``"channels"`` section (one series in).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.inference.channels import parse_channels
from export.commands import CommandError

#: a contrast-enhanced T1's description: a mark right after "T1" (T1c, T1+C, T1 Gd), or a contrast word anywhere
_T1_CONTRAST = (r"t1w?[ _-]*(c|ce|gd|post|\+c?)(?![a-z])"
                r"|(?<![a-z])(post|gd|gad[a-z]*|contrast|km|ce)(?![a-z])")
#: channel name (lower case, without spaces, dashes and underscores) -> the rule's modality and description
_KNOWN: dict[str, tuple[str, str | None]] = {
    "ct": ("CT", None),
    "pet": ("PT", None),
    "pt": ("PT", None),
    "mr": ("MR", None),
    "mri": ("MR", None),
    "t1": ("MR", rf"^(?!.*({_T1_CONTRAST})).*t1(?!\d)"),
    "t2": ("MR", r"^(?!.*flair).*t2(?!\d|\*|star)"),
    "flair": ("MR", r"flair"),
    "adc": ("MR", r"adc|apparent[ _-]*diffusion"),
    "dwi": ("MR", r"^(?!.*adc).*(dwi|diffusion|trace|b[ _-]?1000)"),
}
for _name in ("t1c", "t1ce", "t1gd", "t1post", "t1contrast", "t1+c"):
    _KNOWN[_name] = ("MR", rf"^(?=.*t1).*({_T1_CONTRAST})")
_KNOWN["t1w"], _KNOWN["t2w"] = _KNOWN["t1"], _KNOWN["t2"]


def default_rules(channel_names: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """One rule per channel in model order (dataset.json's keys "0", "1", ...), or None for one channel."""
    names = [str(channel_names[k]) for k in sorted(channel_names, key=lambda k: int(k))]
    if len(names) < 2:
        return None
    rules = []
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name} ({seen[name]})"  # the runtime wants distinct names
        rule: dict[str, Any] = {"name": label}
        modality, description = _KNOWN.get(re.sub(r"[\s_-]+", "", name.lower()), (None, re.escape(name)))
        if modality is not None:
            rule["modality"] = modality
        if description is not None:
            rule["series_description"] = description
        rules.append(rule)
    return rules


def read_channels(path: Path) -> list[dict[str, Any]]:
    """``--channels FILE``: a JSON list of rules in the manifest's ``"channels"`` format."""
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"--channels {path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(rules, list):
        raise CommandError(f"--channels {path}: must hold a JSON list of rules, one per input channel, got "
                           f"{type(rules).__name__}")
    return rules


def channels_section(channel_names: Mapping[str, Any], override: Path | None,
                     modalities: Sequence[str]) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """The ``"channels"`` rules (``override``'s, else the defaults) and the modalities the listener must accept
    for them (``modalities`` and each rule's), checked as the runtime will read them."""
    count = len(channel_names)
    if override is not None and count < 2:
        raise CommandError(f"--channels is for models of several input channels; this one takes {count} "
                           "(one series in, no 'channels' section)")
    rules = read_channels(override) if override is not None else default_rules(channel_names)
    if rules is None:
        return None, list(modalities)
    wanted = list(dict.fromkeys([*modalities, *(str(r["modality"]).upper() for r in rules
                                                if isinstance(r, dict) and isinstance(r.get("modality"), str))]))
    problems: list[str] = []
    parse_channels(rules, count, wanted, problems)
    if problems:
        source = f"--channels {override}" if override is not None else "the rules made from channel_names"
        raise CommandError(f"{source} cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))
    return rules, wanted
