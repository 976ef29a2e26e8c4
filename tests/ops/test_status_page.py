"""The status page: the service as a user runs it, two series pushed with DCMTK, the page read by Chromium.

The page is server-rendered, so Chromium's DOM after load (``--dump-dom``) is what a person sees; the pictures
it points at are fetched and decoded as the browser would. The access token has unit tests of its own.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.errors import ConfigError
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.ops.telemetry import Metrics
from edge_runtime.ops.web import render
from edge_runtime.ops.web.access import COOKIE, TOKEN_ENV, AccessToken
from edge_runtime.ops.web.index import SpoolIndex
from edge_runtime.ops.web.quality import confidence, dice_history, drift_gauges
from edge_runtime.ops.web.server import HttpServer, Request, Response
from edge_runtime.results.thumbnails import LARGE_SIZE, THUMB_SIZE
from edge_runtime.spool import Spool
from phantom import make_phantom, write_reference_seg, write_series
from tests.egress.test_sender import publish
from tests.peers import ServiceProcess, StoreSCP, free_port, storescu

TOKEN = "s3cret-token-for-the-status-page"
PATIENT = {"PatientName": "STATUSPAGE^TESTPATIENT", "PatientID": "SPID0042977", "PatientBirthDate": "19450317"}
#: what must appear on no page and in no image: the name as stored and as a viewer shows it, the ID, the birth date
FORBIDDEN = ("STATUSPAGE", "TESTPATIENT", "SPID0042977", "19450317", "1945-03-17")


def get(url: str, token: str | None = TOKEN, cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET without following redirects: status, headers (lower-case names), body."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return None

    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        with exc:  # an error answer holds its connection until closed
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# -- the access token ------------------------------------------------------------------------------------------


@pytest.fixture
def gated_server() -> Iterator[str]:
    """The service's HTTP server with the token's gate, serving a page and the two open probes."""
    ok = Response.text(200, "fine\n")
    server = HttpServer(
        "127.0.0.1",
        free_port(),
        {"/": lambda _: ok, "/healthz": lambda _: ok, "/readyz": lambda _: ok, "/metrics": lambda _: ok},
        gate=AccessToken(TOKEN).gate,
    )
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_token_guards_every_path_but_the_probes(gated_server: str) -> None:
    for probe in ("/healthz", "/readyz"):
        assert get(gated_server + probe, token=None)[0] == 200, probe
    for path in ("/", "/metrics", "/series", "/thumbs/1/axial.png"):
        status, headers, _ = get(gated_server + path, token=None)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert get(gated_server + path, token=TOKEN[:-1] + "x")[0] == 401, path
    assert get(gated_server + "/metrics")[0] == 200
    assert get(gated_server + "/?token=wrong-token-of-some-length", token=None)[0] == 401

    # a browser: the token once in the address, then a cookie that is not the token itself
    status, headers, _ = get(gated_server + f"/?state=failed&token={TOKEN}", token=None)
    assert status == 303 and headers["location"] == "/?state=failed"
    cookie = headers["set-cookie"].split(";", 1)[0]
    assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert get(gated_server + "/", token=None, cookie=cookie)[0] == 200
    assert get(gated_server + "/", token=None, cookie=f"{COOKIE}=0123abcd")[0] == 401
    # the redirect never leads to another host, whatever path a link carried the token on
    for path in ("//evil.example/", "/\\evil.example/"):
        answer = AccessToken(TOKEN).gate(Request(path, {"token": TOKEN}, {}))
        assert answer is not None and dict(answer.headers)["Location"] == "/", path


def test_the_token_never_reaches_the_log(gated_server: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.ops.web.server"):
        assert get(gated_server + f"/?token={TOKEN}&state=done", token=None)[0] == 303
        assert get(gated_server + f"/series?token={TOKEN}", token=None)[0] == 303
        deadline = time.monotonic() + 5
        while caplog.text.count("303") < 2 and time.monotonic() < deadline:  # logged after the answer is sent
            time.sleep(0.05)
    assert caplog.text.count("token=(hidden)") == 2, caplog.text
    assert TOKEN not in caplog.text


def test_no_write_actions(gated_server: str) -> None:
    request = urllib.request.Request(gated_server + "/", data=b"x", method="POST")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    with refused.value:
        assert refused.value.code == 405


def test_token_comes_from_a_file_or_the_environment_never_too_short(tmp_path: Path) -> None:
    assert AccessToken.configured(None, {}) is None
    assert AccessToken.configured(None, {TOKEN_ENV: TOKEN}) == AccessToken(TOKEN)
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert AccessToken.configured(tmp_path / "token", {TOKEN_ENV: "another-token-entirely"}) == AccessToken(TOKEN)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="16 or more"):
        AccessToken.configured(tmp_path / "short", {})
    with pytest.raises(ConfigError, match="16 or more"):
        AccessToken.configured(None, {TOKEN_ENV: "two words and then some more"})


# -- quality over time, from what the service keeps -----------------------------------------------------------


def test_quality_shows_agreement_confidence_and_drift_where_the_service_has_them(tmp_path: Path) -> None:
    history = tmp_path / "validation.jsonl"
    lines = [
        {"time": "2026-12-01T10:00:00+0000", "series": "aaa", "labels": {"Liver": {"dice": 0.91}}},
        {"time": "2026-12-02T10:00:00+0000", "series": "bbb", "labels": {"Liver": {"dice": 0.42}}},
    ]
    history.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"time": "2026-12-03T1')  # cut short
    dice = dice_history(history)
    assert [(p.series, p.dice) for p in dice["Liver"]] == [("aaa", 0.91), ("bbb", 0.42)]

    result = tmp_path / "result"
    result.mkdir()
    segments = [
        {"name": "Liver", "mean_confidence": 0.93, "low_confidence": False},
        {"name": "Spleen", "mean_confidence": 0.41, "low_confidence": True},
        {"name": "Kidney", "mean_confidence": None},
    ]
    (result / "measurements.json").write_text(json.dumps({"segments": segments}))
    assert confidence(result) == {"Liver": (0.93, False), "Spleen": (0.41, True)}

    metrics = Metrics()
    assert drift_gauges(metrics.registry) == []  # no drift reference: no drift section
    metrics.observe_drift("m 1", [("hu_p50", 0.31, 0.001, 2)], window=40)
    html = render.page(
        "t",
        [],
        [],
        render.QualityView(dice, {"Liver": (221, 130, 101)}, [3.0, 5.0], [], [("ccc", confidence(result))], []),
        None,
    )
    assert 'data-label="Liver"' in html and "2 comparisons" in html and "#dd8265" in html
    assert 'class="low"' in html and "0.410" in html and "p50 4.0 s, p95 4.9 s (2 results)" in html
    assert 'id="drift"' not in html
    quality = render.QualityView({}, {}, [], [], [], drift_gauges(metrics.registry))
    html = render.page("t", [], [], quality, None)
    drift = re.search(r'<table id="drift">(.*?)</table>', html)
    assert drift and "feature=hu_p50" in drift.group(1) and "<td>0.31</td>" in drift.group(1), html


# -- the page, end to end ------------------------------------------------------------------------------------


@dataclass
class Row:
    state: str
    #: plane -> thumbnail URL
    pictures: dict[str, str] = field(default_factory=dict)
    #: the larger views the thumbnails link to
    links: list[str] = field(default_factory=list)


class SeriesRows(HTMLParser):
    """The rows of the page's series table (``tr.series``) by series hash, with the pictures each shows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, Row] = {}
        #: the labels with a Dice chart under Quality over time
        self.dice_labels: set[str] = set()
        self._row: Row | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and a.get("class") == "series":
            self._row = self.rows[a["data-series"]] = Row(a["data-state"])
        elif self._row is not None and tag == "img" and a.get("data-plane"):
            self._row.pictures[a["data-plane"]] = a["src"]
        elif self._row is not None and tag == "a" and a.get("class") == "pic":
            self._row.links.append(a["href"])
        elif tag == "figure" and a.get("class") == "dice":
            self.dice_labels.add(a["data-label"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/bootstrap --dev does it)")
    return path


def browse(url: str, profile: Path, *args: str) -> str:
    """Headless Chromium on ``url`` with its own profile; its standard output (the DOM for ``--dump-dom``)."""
    out = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # as root (CI containers) Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def wait_for_series(base: str, done: Callable[[list[dict]], bool], timeout: float = 120.0) -> list[dict]:
    """``/series`` (as JSON) until ``done(rows)``."""
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = json.loads(get(base + "/series")[2])["series"]
        if done(rows):
            return rows
        time.sleep(0.3)
    raise TimeoutError(f"the series did not get there in {timeout} s: {rows}")


def by_modality(rows: list[dict], modality: str) -> dict:
    return next((r for r in rows if r["modality"] == modality and r["state"] in ("done", "failed")), {})


def small_field_package(folder: Path) -> Path:
    """The bundled package without its declared domain: the page is the subject here, and a series small enough
    to segment in seconds on two cores lies outside the domain the bundled model declares."""
    shutil.copytree(DEFAULT_PACKAGE, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("domain", None)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.mark.e2e
def test_status_page_in_chromium(tmp_path: Path, storescp: StoreSCP) -> None:
    chromium()
    (tmp_path / "token").write_text(TOKEN)
    phantom = make_phantom((24, 64, 64), (2.5, 3.5, 3.5), rng=21)
    good = write_series(
        phantom.hu, phantom.spacing, tmp_path / "good", series_description="Status page CT", extra=PATIENT
    )
    tilted = write_series(phantom.hu, phantom.spacing, tmp_path / "tilted", gantry_tilt_deg=20.0, extra=PATIENT, rng=22)
    service = ServiceProcess(
        tmp_path / "svc",
        "--quiet-seconds",
        "1",
        "--http-token-file",
        str(tmp_path / "token"),
        "--model",
        str(small_field_package(tmp_path / "package")),
        "--destination",
        storescp.address,
        "--destination",
        f"DOWN@127.0.0.1:{free_port()}",  # nothing listens there
    )
    try:
        base = f"http://127.0.0.1:{service.http_port}"
        storescu(service.port, list(good.paths))
        storescu(service.port, list(tilted.paths))
        rows = wait_for_series(  # pictures are drawn just after the result is published
            base, lambda rows: {"done", "failed"} <= {r["state"] for r in rows if r["pictures"] or r["reason"]}
        )
        states = {r["state"]: r for r in rows}
        assert set(states) == {"done", "failed"}, rows
        assert states["failed"]["reason"].startswith("gantry-tilt"), states["failed"]
        # a reference segmentation pushed back: Quality over time gets a Dice per label
        reference = write_reference_seg(good, phantom.labels, tmp_path / "reference.dcm")
        storescu(service.port, [reference], extra=["-R"])
        compared = by_modality(wait_for_series(base, lambda rows: bool(by_modality(rows, "SEG"))), "SEG")
        assert compared["state"] == "done", compared

        # what a person sees: Chromium, token once in the address, then its cookie for the pictures
        dom = browse(f"{base}/?token={TOKEN}", tmp_path / "profile", "--dump-dom")
        table = SeriesRows()
        table.feed(dom)
        done, failed = states["done"]["series"], states["failed"]["series"]
        assert table.rows[done].state == "done" and table.rows[failed].state == "failed", table.rows
        assert "gantry-tilt" in dom and "Status page CT" in dom
        assert table.dice_labels >= {"Lung", "Liver"}, table.dice_labels
        failing = re.search(r"<dt>failing destinations</dt><dd>(.*?)</dd>", dom)
        assert failing and failing.group(1).startswith("DOWN@127.0.0.1"), failing
        assert "to the result written: p50" in dom and "to every destination: no result" in dom  # DOWN has none
        assert table.rows[failed].pictures == {}
        pictures = table.rows[done].pictures
        assert set(pictures) == {"axial", "coronal", "sagittal"}

        colours = {label.color for label in ModelPackage.load(DEFAULT_PACKAGE).labels}
        images: list[bytes] = []
        for src in [*pictures.values(), *table.rows[done].links]:
            status, headers, png = get(base + src)
            assert status == 200 and headers["content-type"] == "image/png", src
            images.append(png)
        for png, size in zip(images, [THUMB_SIZE] * 3 + [LARGE_SIZE] * 3, strict=True):
            with Image.open(io.BytesIO(png)) as image:
                rgb = np.asarray(image.convert("RGB"))
            assert rgb.shape == (size, size, 3)
            present = {tuple(int(v) for v in c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}
            assert present & colours, "the segments are drawn in the package's colours"

        screenshot = tmp_path / "status-page.png"
        browse(f"{base}/?token={TOKEN}", tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1400,1100")
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("ARTEFACTS"):
            Path(os.environ["ARTEFACTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(screenshot, Path(os.environ["ARTEFACTS"]) / screenshot.name)

        filtered = SeriesRows()
        filtered.feed(get(base + "/?state=failed")[2].decode())
        assert {key: row.state for key, row in filtered.rows.items()} == {failed: "failed"}

        # no patient name, ID or birth date on any page or in any image
        pages = [dom.encode(), *images]
        for path in ("/", "/?state=failed", "/?state=done", "/series", "/metrics", "/healthz", "/readyz"):
            status, _, body = get(base + path)
            assert status == 200, path
            pages.append(body)
        for body in pages:
            for word in FORBIDDEN:
                assert word.encode() not in body.upper(), word
        assert get(base + "/", token=None)[0] == 401
    finally:
        code = service.stop()
    assert code == 0, service.log()[-3000:]
    assert "Traceback" not in service.log()


def test_failing_destinations_name_retries_and_objects_refused_for_good(tmp_path: Path) -> None:
    """A destination that is down (pending after failed attempts) and one that refused an object for good (a SOP
    class it does not store) are both listed with their last error; a destination that took everything is not."""
    spool = Spool(tmp_path / "spool")
    try:
        files = [tmp_path / "seg.dcm", tmp_path / "labelmap.dcm"]
        publish(spool, {"down": files, "old-pacs": files, "pacs": files})
        for item in spool.due_outbox():
            if item.destination == "down":
                spool.mark_failed_attempt(item.id, "association not established", time.time() + 60)
            elif item.destination == "old-pacs" and item.path.name == "labelmap.dcm":
                spool.mark_undeliverable(item.id, "Label Map Segmentation Storage not accepted by the node")
            else:
                spool.mark_sent(item.id)
        failing = {f.destination: f for f in SpoolIndex(spool.root).failing_destinations()}
    finally:
        spool.close()
    assert set(failing) == {"down", "old-pacs"}
    assert (failing["down"].pending, failing["down"].refused) == (2, 0)
    assert failing["down"].last_error == "association not established"
    assert (failing["old-pacs"].pending, failing["old-pacs"].refused) == (0, 1)
    assert "not accepted" in (failing["old-pacs"].last_error or "")
