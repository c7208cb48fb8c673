"""A loopback stand-in for the Hugging Face Hub: the two routes huggingface_hub uses to list and fetch a
model's files (`/api/models/REPO/revision/REV` and `/REPO/resolve/REV/FILE`, with Range requests), plus
switches to make it fail the ways the real Hub does: gated repos, unknown repos, dropped connections,
corrupted content, slow transfers (huggingface_hub reads in 10 MiB chunks, so only whole chunks reach the partial file). Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_MIN = 1024  # files this large are served as LFS files (sha256 in the listing), like the Hub's weights


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    corrupt: set[str] = dataclasses.field(default_factory=set)  # served with one byte changed
    drop_after: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> bytes before hanging up (once)
    slow_after: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> bytes served fast, then slowly


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return hub._listing(self, m.group(1))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):  # snapshot_download
                    return hub._listing(self, m.group(1), tree=True)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return hub._file(self, m.group(1), m.group(3))
                self.send_error(404)

            def do_HEAD(self):  # hf_hub_download asks for a file's commit, etag and size first
                hub.requests.append((self.path, None))
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0]):
                    return hub._file(self, m.group(1), m.group(3), head=True)
                self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def ranges(self, name: str) -> list[str | None]:
        return [r for p, r in self.requests if p.endswith(f"/{name}")]

    @staticmethod
    def _error(handler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _listing(self, handler, repo_id: str, tree: bool = False) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        siblings, entries = [], []
        for name, data in repo.files.items():
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append({"rfilename": name, "size": len(data), "blobId": blob,
                             **({"lfs": lfs} if len(data) >= LFS_MIN else {})})
            entries.append({"type": "file", "path": name, "size": len(data), "oid": blob,
                            **({"lfs": {"oid": lfs["sha256"], **lfs}} if len(data) >= LFS_MIN else {})})
        body = json.dumps(entries if tree else {
            "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
            "gated": "manual" if repo.gated else False, "siblings": siblings}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _file(self, handler, repo_id: str, name: str, head: bool = False) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        if repo.gated:
            return self._error(handler, 403, "GatedRepo", "Access to model is restricted: accept the conditions")
        if name not in repo.files:
            return self._error(handler, 404, "EntryNotFound", "Entry not found")
        data = repo.files[name]
        if name in repo.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        if (r := handler.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-", r)):
            start = int(m.group(1))
        body = data[start:]
        handler.send_response(206 if start else 200)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Repo-Commit", repo.commit)
        handler.end_headers()
        if head:
            return
        if name in repo.drop_after:  # hang up mid-file, once
            handler.wfile.write(body[:repo.drop_after.pop(name)])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        fast = repo.slow_after.get(name, len(body))
        handler.wfile.write(body[:fast])
        for i in range(fast, len(body), 4096):
            handler.wfile.flush()
            time.sleep(0.05)
            handler.wfile.write(body[i:i + 4096])
