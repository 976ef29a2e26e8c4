"""Destinations as the command line and the TOML file write them, and which objects each one receives."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.config import build_config, load_toml
from edge_runtime.egress.destination import DICOMWEB, DIMSE, Destination, DimseNode, Secret, StowTarget, route
from edge_runtime.errors import ConfigError
from edge_runtime.results.formats import DEFAULT_FORMATS


def test_the_old_form_is_a_dimse_node_with_the_default_formats() -> None:
    d = Destination.parse("PACS@10.0.0.5:104")
    assert (d.name, d.kind, d.formats) == ("PACS@10.0.0.5:104", DIMSE, DEFAULT_FORMATS)
    assert d.target == DimseNode("PACS", "10.0.0.5", 104)
    assert Destination.parse("V@[::1]:11112").target == DimseNode("V", "::1", 11112)


def test_the_compact_form_names_formats_and_a_dicomweb_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Destination.parse("PACS@pacs.local:104;formats=labelmap,binary;name=pacs")
    assert (d.name, d.formats) == ("pacs", ("binary", "labelmap")), "formats in the order results are written"
    token = tmp_path / "token"
    token.write_text("abc\n")
    web = Destination.parse(f"dicomweb+https://archive.local/dicom-web/;token-file={token};formats=sr,rtstruct")
    assert web.kind == DICOMWEB and web.name == "https://archive.local/dicom-web" and web.formats == ("rtstruct", "sr")
    assert isinstance(web.target, StowTarget) and web.target.authorization() == "Bearer abc"
    token.write_text("rotated")
    assert web.target.authorization() == "Bearer rotated", "a rotated token file is read at the next send"
    monkeypatch.setenv("ARCHIVE_PASSWORD", "pw")
    basic = Destination.parse("dicomweb+http://h:8042/dicom-web;user=edge;password-env=ARCHIVE_PASSWORD")
    assert isinstance(basic.target, StowTarget) and basic.target.authorization() == "Basic ZWRnZTpwdw=="


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("PACS@h:104;formats=binary,jpeg", "unknown result format(s) jpeg"),
        ("PACS@h:104;formats=", "formats is empty"),
        ("PACS@h:104;colour=blue", "unknown key(s) for a dimse destination: colour"),
        ("dicomweb+https://h/dw;token=abc", "token given as a value: secrets are named by where they are kept"),
        ("dicomweb+https://user:pw@h/dw", "credentials do not belong in the URL"),
        ("dicomweb+ftp://h/dw", "is not an http:// or https:// URL"),
        ("dicomweb+https://h/dw;token-env=EDGE_TEST_UNSET_VARIABLE", "EDGE_TEST_UNSET_VARIABLE is not set"),
        ("dicomweb+https://h/dw;user=edge", "needs both user and password"),
        ("PACS@h:104;tls-cert=/nonexistent.pem", "tls_cert /nonexistent.pem: no such file"),
        ("PACS@h:104;name=a b", "name 'a b'"),
    ],
)
def test_what_is_wrong_is_said(text: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        Destination.parse(text)
    assert says in str(err.value)


def test_destination_tables_in_toml_beside_the_old_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVE_TOKEN", "t0ken")
    f = tmp_path / "edge.toml"
    f.write_text('quiet_seconds = 2\ndestination = ["OLD@10.0.0.9:104"]\n')
    assert [d.name for d in build_config(load_toml(f)).destination] == ["OLD@10.0.0.9:104"]
    f.write_text(
        "quiet_seconds = 2\n"
        '[[destination]]\nname = "pacs"\naddress = "PACS@10.0.0.5:104"\nformats = ["binary", "sr", "overlay"]\n'
        '[[destination]]\nname = "tps"\nae_title = "TPS"\nhost = "tps.local"\nport = 11112\nformats = ["rtstruct"]\n'
        '[[destination]]\nname = "archive"\nkind = "dicomweb"\nurl = "https://archive/dicom-web"\n'
        'token_env = "ARCHIVE_TOKEN"\nformats = ["labelmap", "sr"]\n'
    )
    cfg = build_config(load_toml(f))
    assert cfg.quiet_seconds == 2
    assert [(d.name, d.kind, d.formats) for d in cfg.destination] == [
        ("pacs", DIMSE, ("binary", "overlay", "sr")),
        ("tps", DIMSE, ("rtstruct",)),
        ("archive", DICOMWEB, ("labelmap", "sr")),
    ]
    assert cfg.destination[2].target == StowTarget("https://archive/dicom-web", token=Secret(env="ARCHIVE_TOKEN"))


def test_two_destinations_with_one_name_stop_the_start() -> None:
    with pytest.raises(ConfigError, match="destinations share a name: pacs"):
        build_config({"destination": ["A@h:1;name=pacs", "B@h:2;name=pacs"]})


def test_each_destination_gets_its_formats_objects(tmp_path: Path) -> None:
    pacs = Destination.parse("PACS@h:1;formats=binary,sr,fractional;name=pacs")
    tps = Destination.parse("TPS@h:2;formats=rtstruct;name=tps")
    seg, sr, rt = tmp_path / "seg.dcm", tmp_path / "sr.dcm", tmp_path / "rtstruct.dcm"
    plan, missing = route([pacs, tps], {"binary": [seg], "sr": [sr], "rtstruct": [rt], "labelmap": [tmp_path]})
    assert plan == {"pacs": [seg, sr], "tps": [rt]}
    assert missing == ["fractional"], "a format asked for and not written is named"
