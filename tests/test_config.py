from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.config import ConfigError, build_config, load_toml
from edge_runtime.egress.destination import Destination, DimseNode


def test_defaults_are_valid() -> None:
    cfg = build_config({})
    assert cfg.ae_title == "EDGE" and cfg.port == 11112 and cfg.device == "cpu" and cfg.destination == ()


def test_toml_takes_the_command_line_keys(tmp_path: Path) -> None:
    f = tmp_path / "edge.toml"
    f.write_text(
        'ae-title = "SEGBOX"\nport = 4242\nquiet_seconds = 2.5\n'
        'destination = ["PACS@10.0.0.5:104", "VIEW@viewer.local:11112"]\nallowed_calling_aets = ["CT1"]\n'
    )
    cfg = build_config(load_toml(f))
    assert cfg.ae_title == "SEGBOX" and cfg.port == 4242 and cfg.quiet_seconds == 2.5
    assert [d.target for d in cfg.destination] == [
        DimseNode("PACS", "10.0.0.5", 104),
        DimseNode("VIEW", "viewer.local", 11112),
    ]
    assert cfg.allowed_calling_aets == ("CT1",)


def test_every_problem_is_reported_with_key_value_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(
            {"port": 70000, "quiet_seconds": -1, "device": "gpu", "destination": "PACS:104", "colour": 1}
        )
    text = str(err.value)
    assert "port = 70000 is not allowed: an integer 0-65535" in text
    assert "quiet_seconds = -1 is not allowed" in text
    assert "device = 'gpu' is not allowed: one of cpu, cuda, tensorrt" in text
    assert "destination = 'PACS:104'" in text and "AE@host:port" in text
    assert "unknown key 'colour'" in text
    assert len(err.value.problems) == 5


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(f)


def test_serve_exits_2_on_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "99999", "--ae-title", "A" * 17]) == 2
    err = capsys.readouterr().err
    assert "port = 99999" in err and "ae_title = 'AAAAAAAAAAAAAAAAA'" in err


@pytest.mark.parametrize("text", ["PACS@host", "@h:1", "P@h:0", "TOOLONGAETITLE123@h:1"])
def test_destination_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Destination.parse(text)
