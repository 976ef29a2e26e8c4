"""Orthanc with its DICOMweb plugin, as a PACS that speaks DICOMweb."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers.base import dcmtk_env, free_port, skip_missing, stop_process, wait_port

# -- Orthanc with its DICOMweb plugin ------------------------------------------------------------------------

#: where Debian's ``orthanc`` and ``orthanc-dicomweb`` packages install the server and the plugin
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_programs() -> tuple[str, str]:
    """Orthanc's binary and its DICOMweb plugin, or skip with the packages to install."""
    binary = str(ORTHANC_BINARY) if ORTHANC_BINARY.exists() else shutil.which("Orthanc")
    plugin = DICOMWEB_PLUGIN if DICOMWEB_PLUGIN.exists() else None
    if plugin is None and shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30)
        plugin = next((Path(p) for p in listed.stdout.splitlines() if p.endswith("DicomWeb.so")), None)
    if binary is None or plugin is None:
        skip_missing("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    return binary, str(plugin)


class Orthanc:
    """Orthanc as a PACS that speaks DICOMweb: its own storage in ``folder``, free HTTP and DICOM ports, the
    DICOMweb plugin at ``/dicom-web``; ``dicomweb_servers`` ({name: base URL}) are the servers its STOW-RS
    client may send to (``POST /dicom-web/servers/<name>/stow``), with ``dicomweb_token`` as their bearer
    token. With ``users`` ({name: password}) its HTTP side asks for basic authentication (the REST calls here
    use the first user). Construction returns once its REST API and the plugin answer; :meth:`stop` ends it."""

    def __init__(
        self,
        folder: Path,
        *,
        dicomweb_servers: dict[str, str] | None = None,
        dicomweb_token: str | None = None,
        users: dict[str, str] | None = None,
        timeout: float = 60.0,
    ):
        binary, plugin = orthanc_programs()
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "edge-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "Plugins": [plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    name: {"Url": url, "HttpHeaders": {"Authorization": f"Bearer {dicomweb_token}"}}
                    if dicomweb_token
                    else [url]
                    for name, url in (dicomweb_servers or {}).items()
                },
            },
        }
        self._auth = None
        if users:
            import base64

            self._auth = "Basic " + base64.b64encode(":".join(next(iter(users.items()))).encode()).decode()
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = folder / "orthanc.log"
        with open(self.log_path, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary, str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=dcmtk_env(),  # Orthanc's DICOM side is DCMTK
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            print(self.log()[-3000:], file=sys.stderr)
            raise

    def _wait_ready(self, timeout: float) -> None:
        wait_port(self.http_port, timeout, self.proc)
        end = time.monotonic() + timeout
        while True:
            try:
                self.get("/dicom-web/studies")
                return
            except (OSError, RuntimeError):
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    @property
    def dicomweb_url(self) -> str:
        """The base URL of its DICOMweb API (STOW-RS posts to ``/studies`` below it)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def request(self, method: str, path: str, body: bytes | dict | None = None, content_type: str = "") -> Any:
        """One REST call; the decoded JSON answer (None when empty). An HTTP error raises RuntimeError."""
        raw = self.raw(method, path, body, content_type)
        return json.loads(raw) if raw.strip() else None

    def raw(self, method: str, path: str, body: bytes | dict | None = None, content_type: str = "") -> bytes:
        """One REST call; the body of the answer as it came. An HTTP error raises RuntimeError."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type or "application/json")
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise RuntimeError(f"Orthanc {method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | dict | None = None, content_type: str = "") -> Any:
        return self.request("POST", path, body, content_type)

    def upload(self, paths: list[Path]) -> str:
        """Store files through the REST API; the Orthanc ID of the series of the last one."""
        answer: Any = None
        for path in paths:
            answer = self.post("/instances", path.read_bytes(), "application/dicom")
        return str(answer["ParentSeries"])

    def instances(self) -> dict[str, str]:
        """Every instance it holds as {SOP Instance UID: SOP Class UID}, asked through DICOMweb QIDO-RS."""
        found = self.get("/dicom-web/instances?includefield=00080016") or []
        return {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in found}

    def instance_file(self, sop_uid: str) -> bytes:
        """The file Orthanc keeps for one SOP Instance UID (``/tools/lookup``, then ``/instances/<id>/file``)."""
        [found] = [r for r in self.post("/tools/lookup", sop_uid.encode(), "text/plain") if r["Type"] == "Instance"]
        return self.raw("GET", f"/instances/{found['ID']}/file")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 30, group=True)
