"""A real Orthanc PACS for the tests: Debian's ``orthanc`` with its DICOMweb plugin
(``make pacs`` installs both), on 127.0.0.1 with HTTP basic authentication on, a free port, a
temporary storage folder and configuration, removed when it stops.

Orthanc 1.10 binds every interface; ``RemoteAccessAllowed: false`` makes it refuse any client
but loopback, and the DICOM (DIMSE) server is off. Test data reach it through STOW-RS, and the
tests count instances through its REST API.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if not os.path.exists(ORTHANC):
        return "Orthanc is not installed (make pacs installs Debian's orthanc)"
    if not os.path.exists(PLUGIN):
        return "Orthanc's DICOMweb plugin is not installed (make pacs: orthanc-dicomweb)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process; ``user``/``password`` its only account."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="medray-orthanc-"))
        self.port = _free_port()
        self.user = "medray"
        self.password = f"pw-{secrets.token_hex(12)}"
        self.proc: subprocess.Popen[bytes] | None = None
        config = {
            "Name": "medray-test", "StorageDirectory": str(self.dir / "db"),
            "IndexDirectory": str(self.dir / "db"), "HttpPort": self.port,
            "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "Plugins": [PLUGIN], "HttpTimeout": 10, "HttpThreadsCount": 8,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "ExecuteLuaEnabled": False, "StableAge": 1,
        }
        (self.dir / "orthanc.json").write_text(json.dumps(config))

    @property
    def uri(self) -> str:
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    @property
    def credentials(self) -> str:
        return f"{self.user}:{self.password}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = open(self.dir / "orthanc.log", "ab")  # noqa: SIM115 - held by the process
        self.proc = subprocess.Popen([ORTHANC, str(self.dir / "orthanc.json")], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): "
                                   f"{(self.dir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.rest("GET", "/system")
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- HTTP -------------------------------------------------------------------------------
    def _auth(self) -> str:
        return "Basic " + base64.b64encode(self.credentials.encode()).decode()

    def rest(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     method=method,
                                     headers={"Authorization": self._auth(), **(headers or {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data.strip() else None

    def stow(self, files: list[bytes]) -> None:
        """Store DICOM files through STOW-RS (the test's own multipart body)."""
        boundary = f"test-{uuid.uuid4().hex}"
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode()
        answer = self.rest("POST", "/dicom-web/studies", body, {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        failed = ((answer or {}).get("00081198") or {}).get("Value")
        assert not failed, answer  # no failed SOP instance

    def instances(self) -> list[str]:
        return list(self.rest("GET", "/instances"))

    def instance_file(self, orthanc_id: str) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/instances/{orthanc_id}/file",
                                     headers={"Authorization": self._auth()})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())


def make_instance(template: str, *, modality: str, study_date: str, patient: str,
                  sop_class: str | None = None) -> bytes:
    """A pydicom test file rewritten as a new instance of a new study and series, with a
    controlled modality, study date and (fake) patient identity."""
    from io import BytesIO

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(template))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if sop_class:
        ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality, ds.StudyDate, ds.SeriesDate = modality, study_date, study_date
    ds.PatientName, ds.PatientID = f"{patient}^TEST", f"PID-{patient}"
    ds.AccessionNumber = f"ACC{patient}"[:16]
    ds.BurnedInAnnotation = "NO"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
