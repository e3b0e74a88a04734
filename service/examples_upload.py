"""`clipserve upload-examples`: an ImageFolder (one sub-folder of images per label) sent to a running service as
a saved classifier's few-shot examples, over plain HTTP (standard library only: it runs from any install).

The classifier is created from the folder names when it does not exist yet; images go up a few per request
(`POST /v1/classifiers/{name}/examples`, multipart), and a refused image is reported with the service's own
error message without stopping the rest.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class UploadReport:
    sent: int = 0
    refused: list[str] = field(default_factory=list)  # "path: the service's message"


def image_folder(root: Path) -> dict[str, list[Path]]:
    """label -> its image files, from the sub-folders of `root` (sorted, hidden ones skipped)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        folder.name: sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for folder in folders
    }


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict]:
        headers = dict(self.headers) | ({"Content-Type": content_type} if content_type else {})
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())


def _json(body: bytes) -> dict:
    """The answer's JSON; a proxy's HTML error page becomes an error of the same shape."""
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError:
        return {"error": {"message": body[:200].decode(errors="replace")}}
    return value if isinstance(value, dict) else {}


def _multipart(fields: dict[str, str], files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for path in files:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: {kind}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def upload(
    client: Client,
    classifier: str,
    folder: dict[str, list[Path]],
    *,
    templates: str | None = None,
    batch: int = 8,
    progress: Callable[[int], None] = lambda _: None,
) -> UploadReport:
    """Creates the classifier from the folder's labels if it does not exist, then sends every image."""
    classifier = urllib.parse.quote(classifier, safe="")
    status, body = client.request("GET", f"/v1/classifiers/{classifier}")
    if status == 404:
        definition = {"labels": list(folder), **({"templates": templates} if templates else {})}
        status, body = client.request(
            "PUT", f"/v1/classifiers/{classifier}", json.dumps(definition).encode(), "application/json"
        )
    if status >= 400:
        raise RuntimeError(f"classifier {classifier!r}: {body.get('error', {}).get('message', status)}")
    report = UploadReport()

    def send(label: str, files: list[Path]) -> tuple[int, dict]:
        data, content_type = _multipart({"label": label}, files)
        return client.request("POST", f"/v1/classifiers/{classifier}/examples", data, content_type)

    for label, paths in folder.items():
        for files in _batches(paths, batch):
            status, body = send(label, files)
            if status >= 400 and len(files) > 1:  # a request is all or nothing: find the file at fault
                for path in files:
                    one_status, one_body = send(label, [path])
                    _count(report, path, one_status, one_body)
            else:
                for path in files:
                    _count(report, path, status, body)
            progress(len(files))
    return report


def _count(report: UploadReport, path: Path, status: int, body: dict) -> None:
    if status >= 400:
        report.refused.append(f"{path}: {body.get('error', {}).get('message', f'HTTP {status}')}")
    else:
        report.sent += 1
