"""The listener against hostile and careless peers: stalls, idle sockets, TLS, networks, oversized instances.

The listener runs in-process on a real spool; the peers are real: DCMTK echoscu/storescu and raw sockets.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.ingest.listener import Listener, ListenerConfig
from edge_runtime.spool import Spool
from phantom import write_series
from tests.peers import dcmtk_env, free_port, require_tool


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate signed by it, and a client cert signed by nobody."""
    require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    def self_signed(name: str, common_name: str) -> None:
        run(
            *f"req -x509 -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.pem -days 2 -subj".split(),
            f"/CN={common_name}",
        )

    self_signed("ca", "Test CA")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'scanner'}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    self_signed("rogue", "rogue")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def start(tmp_path: Path, **kwargs: object) -> Listener:
    config = ListenerConfig(ae_title="EDGE", host="127.0.0.1", port=free_port(), modalities=("CT",), **kwargs)  # type: ignore[arg-type]
    listener = Listener(config, Spool(tmp_path / "spool"))
    listener.start()
    return listener


@pytest.fixture
def tls_listener(tmp_path: Path, certs: dict[str, Path]) -> Iterator[Listener]:
    listener = start(
        tmp_path,
        tls_port=free_port(),
        tls_cert=str(certs["server_pem"]),
        tls_key=str(certs["server_key"]),
        tls_ca=str(certs["ca_pem"]),
        max_associations=4,
    )
    yield listener
    listener.stop()


def echo(port: int, *tls: str) -> tuple[bool, float]:
    require_tool("echoscu")
    t0 = time.monotonic()
    out = subprocess.run(
        ["/usr/bin/echoscu", "-aec", "EDGE", "-to", "5", *tls, "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.returncode == 0, time.monotonic() - t0


def tls_args(certs: dict[str, Path], who: str = "client") -> list[str]:
    return ["+tls", str(certs[f"{who}_key"]), str(certs[f"{who}_pem"]), "+cf", str(certs["ca_pem"])]


def test_stalled_and_idle_peers_do_not_block_a_legitimate_echo(tls_listener: Listener, certs: dict[str, Path]) -> None:
    peers = []
    for port in (tls_listener.port, tls_listener.tls_port):
        for _ in range(6):  # more than max_associations (4), on each port
            s = socket.create_connection(("127.0.0.1", port))
            peers.append(s)  # idle: opens TCP and never speaks
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"\x01\x00\x00\x00\x03\xe8\x00\x01")  # A-ASSOCIATE-RQ header announcing 1000 bytes, then 2
            peers.append(s)
    time.sleep(0.5)
    try:
        ok, seconds = echo(tls_listener.port)
        assert ok and seconds < 2.0, seconds
        ok, seconds = echo(tls_listener.tls_port, *tls_args(certs))
        assert ok and seconds < 2.0, seconds
    finally:
        for s in peers:
            s.close()


def test_tls_store_with_a_trusted_client_and_refusal_of_an_untrusted_one(
    tls_listener: Listener, certs: dict[str, Path], tmp_path: Path
) -> None:
    require_tool("storescu")
    info = write_series(np.zeros((3, 16, 16), np.float32), (2.0, 1.0, 1.0), tmp_path / "ct")
    cmd = [
        "/usr/bin/storescu",
        "-aec",
        "EDGE",
        *tls_args(certs),
        "127.0.0.1",
        str(tls_listener.tls_port),
        str(info.paths[0]),
    ]
    out = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = tls_listener.spool.all_series()
    assert row.instance_count == 1
    rogue = ["+tls", str(certs["rogue_key"]), str(certs["rogue_pem"]), "+cf", str(certs["ca_pem"])]
    ok, _ = echo(tls_listener.tls_port, *rogue)
    assert not ok, "a client whose certificate no trusted CA signed must be refused"
    ok, _ = echo(tls_listener.tls_port)  # plain DICOM on the TLS port
    assert not ok


def test_connections_from_outside_the_allowed_networks_are_closed(tmp_path: Path) -> None:
    listener = start(tmp_path, allowed_networks=("10.0.0.0/8",))
    try:
        assert not echo(listener.port)[0]
    finally:
        listener.stop()
    listener = start(tmp_path / "b", allowed_networks=("10.0.0.0/8", "127.0.0.0/8"))
    try:
        assert echo(listener.port)[0]
    finally:
        listener.stop()


def test_oversized_instance_aborts_its_association_and_nothing_is_stored(tmp_path: Path) -> None:
    require_tool("storescu")
    small = write_series(np.zeros((3, 64, 64), np.float32), (2.0, 1.0, 1.0), tmp_path / "small")
    large = write_series(np.zeros((3, 512, 512), np.float32), (2.0, 1.0, 1.0), tmp_path / "large")
    listener = start(tmp_path, max_instance_bytes=100_000)
    try:
        run = lambda p: subprocess.run(  # noqa: E731
            ["/usr/bin/storescu", "-aec", "EDGE", "127.0.0.1", str(listener.port), str(p)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run(large.paths[0]).returncode != 0
        assert run(small.paths[0]).returncode == 0
        (row,) = listener.spool.all_series()
        assert row.series_uid == small.series_uid and row.instance_count == 1
    finally:
        listener.stop()
