"""The manifest's ``"channels"`` written from an nnU-Net model's ``channel_names``, and ``--channels FILE`` in their
place: the rules are read back by the runtime's own parser and choose series as the runtime chooses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.inference.channels import Channels, SeriesFacts, parse_channels
from export.commands import CommandError
from export.nnunet_channels import channels_section, default_rules


def _series(i: int, modality: str, description: str) -> SeriesFacts:
    return SeriesFacts(i, f"s{i}", modality, description, ("ORIGINAL", "PRIMARY"), False, "1.2.3")


def _channels(rules: list[dict], modalities: list[str]) -> Channels:
    problems: list[str] = []
    channels = parse_channels(rules, len(rules), modalities, problems)
    assert not problems and channels is not None
    return channels


@pytest.mark.parametrize(
    ("descriptions", "expected"),
    [
        # a Siemens-style study with a localizer and a DWI beside the four weightings
        (["localizer", "t1_mprage_sag", "t1_mprage_sag_post_gd", "t2_tse_tra", "t2_flair_tra", "ep2d_diff"],
         {"T1": "t1_mprage_sag", "T1c": "t1_mprage_sag_post_gd", "T2": "t2_tse_tra", "FLAIR": "t2_flair_tra"}),
        # another vendor's naming
        (["AX T1 PRE", "AX T1+C", "AX T2", "AX FLAIR", "ADC map"],
         {"T1": "AX T1 PRE", "T1c": "AX T1+C", "T2": "AX T2", "FLAIR": "AX FLAIR"}),
    ],
)
def test_default_rules_tell_the_brats_weightings_apart(descriptions: list[str], expected: dict[str, str]) -> None:
    rules = default_rules({"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"})
    assert rules is not None and [r["name"] for r in rules] == ["T1", "T1c", "T2", "FLAIR"]
    channels = _channels(rules, ["MR"])
    choice = channels.choose([_series(i, "MR", d) for i, d in enumerate(descriptions)])
    assert choice.complete, (choice.missing, choice.ambiguous)
    assert {name: facts.description for name, facts in choice.chosen.items()} == expected


def test_two_candidates_for_one_channel_are_refused_not_guessed() -> None:
    channels = _channels(default_rules({"0": "T1", "1": "FLAIR"}) or [], ["MR"])
    choice = channels.choose([_series(0, "MR", "t1_se"), _series(1, "MR", "flair_tra"), _series(2, "MR", "flair_cor")])
    assert not choice.complete and set(choice.ambiguous) == {"FLAIR"}
    assert "channel FLAIR: 2 series match" in str(choice.refusal(channels))


def test_ct_and_pet_channels_widen_the_accepted_modalities() -> None:
    rules, modalities = channels_section({"0": "CT", "1": "PET"}, None, ["CT"])
    assert rules == [{"name": "CT", "modality": "CT"}, {"name": "PET", "modality": "PT"}]
    assert modalities == ["CT", "PT"]
    choice = _channels(rules, modalities).choose([_series(0, "CT", "CT 3mm"), _series(1, "PT", "PET AC"),
                                                 _series(2, "SR", "dose report")])
    assert choice.complete and choice.chosen["PET"].series_id == 1


def test_a_name_nobody_knows_is_looked_for_in_the_description() -> None:
    rules = default_rules({"0": "T1", "1": "SWI (phase)"}) or []
    assert rules[1] == {"name": "SWI (phase)", "series_description": r"SWI\ \(phase\)"}
    assert _channels(rules, ["MR"]).rule("SWI (phase)").matches(_series(0, "MR", "ax swi (phase) 3d"))


def test_a_single_channel_model_keeps_no_channels_section(tmp_path: Path) -> None:
    assert channels_section({"0": "CT"}, None, ["CT"]) == (None, ["CT"])
    rules = tmp_path / "channels.json"
    rules.write_text(json.dumps([{"name": "CT", "modality": "CT"}]))
    with pytest.raises(CommandError, match="several input channels; this one takes 1"):
        channels_section({"0": "CT"}, rules, ["CT"])


def test_a_channels_file_replaces_the_defaults_and_is_checked_as_the_runtime_reads_it(tmp_path: Path) -> None:
    site = [{"name": "T1", "modality": "MR", "series_description": "^3D T1 TFE$"},
            {"name": "FLAIR", "modality": "MR", "series_description": "^3D FLAIR$", "image_type": ["ORIGINAL"]}]
    path = tmp_path / "channels.json"
    path.write_text(json.dumps(site))
    rules, modalities = channels_section({"0": "T1", "1": "FLAIR"}, path, ["MR"])
    assert rules == site and modalities == ["MR"]
    path.write_text(json.dumps(site[:1]))
    with pytest.raises(CommandError, match="'channels' has 1 item"):
        channels_section({"0": "T1", "1": "FLAIR"}, path, ["MR"])
    path.write_text(json.dumps([{"name": "T1", "series_description": "("}, {"name": "FLAIR"}]))
    with pytest.raises(CommandError, match="not a regular expression"):
        channels_section({"0": "T1", "1": "FLAIR"}, path, ["MR"])
    path.write_text("{}")
    with pytest.raises(CommandError, match="JSON list"):
        channels_section({"0": "T1", "1": "FLAIR"}, path, ["MR"])


def test_an_nnunet_manifest_carries_the_rules_of_its_channel_names(tmp_path: Path) -> None:
    """A two-channel nnU-Net folder (T1 and FLAIR, z-score each, checkpointed as nnU-Net does): the manifest that
    edge-export writes for it has rules for both, and --channels replaces them."""
    pytest.importorskip("torch", reason="torch is not installed (the export extra)")
    pytest.importorskip("dynamic_network_architectures", reason="nnU-Net's network library is not installed")
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from export.cli import build_parser
    from export.nnunet_command import nnunet_manifest
    from export.nnunet_source import load_nnunet_source
    from tests.export.fixtures import NNUNET_ARCH, NNUNET_DATASET, nnunet_plans

    folder = tmp_path / "Dataset998_Brain" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    plans = nnunet_plans()
    plans["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"] * 2,
                                                 use_mask_for_norm=[True, True])
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({**NNUNET_DATASET, "channel_names": {"0": "T1", "1": "FLAIR"}}))
    kwargs = {**NNUNET_ARCH["arch_kwargs"], "conv_op": torch.nn.Conv3d, "norm_op": torch.nn.InstanceNorm3d,
              "nonlin": torch.nn.LeakyReLU}
    network = PlainConvUNet(input_channels=2, num_classes=3, deep_supervision=False, **kwargs)
    torch.save({"network_weights": network.state_dict(), "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")

    source = load_nnunet_source(folder, ["0"])
    assert source.input_channels == source.image_channels == 2
    organ = {"value": "91772007", "scheme": "SCT", "meaning": "Organ"}
    codes = tmp_path / "labels.json"
    codes.write_text(json.dumps([
        {"value": 1, "name": "liver", "category": organ,
         "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}},
        {"value": 2, "name": "spleen", "category": organ,
         "type": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}}]))
    parser = build_parser()
    common = ["package", "--nnunet", str(folder), "--folds", "0", "--labels-json", str(codes), "--out", str(tmp_path)]
    args = parser.parse_args(common)
    manifest = nnunet_manifest(source, args)
    assert [r["name"] for r in manifest["channels"]] == ["T1", "FLAIR"]
    assert manifest["series_filter"]["modalities"] == ["MR"] and manifest["model"]["input_channels"] == 2
    site = tmp_path / "channels.json"
    site.write_text(json.dumps([{"name": "T1", "modality": "MR"}, {"name": "FLAIR", "series_description": "flair"}]))
    args = parser.parse_args([*common, "--channels", str(site)])
    assert nnunet_manifest(source, args)["channels"] == json.loads(site.read_text())
