"""A small stand-in for the Hugging Face Hub's HTTP API, for tests of push_to_hub.

It serves, on 127.0.0.1, the endpoints huggingface_hub's client calls to create a repository and commit
files (whoami, repos/create, validate-yaml, preupload, commit, revision info), answers "regular"
uploads (file contents inside the commit payload, no LFS), and keeps everything it receives:
repositories, commits with their files, request headers, and any request it does not know.

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        hub.commits[0].files["model.safetensors"]
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "tester"


@dataclass
class Commit:
    repo: str
    revision: str
    summary: str
    files: dict[str, bytes] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    oid: str = ""


class FakeHub:
    """The server; `commit_delay_s` makes every commit take that long (to test pushes in flight), and
    `refuse_commits` answers every commit with an error."""

    def __init__(self, commit_delay_s: float = 0.0, refuse_commits: bool = False):
        self.commit_delay_s = commit_delay_s
        self.refuse_commits = refuse_commits
        self.repos: dict[str, dict] = {}
        self.commits: list[Commit] = []
        self.authorizations: list[str | None] = []
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                return body

            def _reply(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.authorizations.append(self.headers.get("Authorization"))
                path = urlparse(self.path).path
                if path == "/api/whoami-v2":
                    return self._reply(200, {"type": "user", "name": USER, "orgs": [],
                                             "auth": {"accessToken": {"displayName": "test", "role": "write"}}})
                parts = path.split("/")
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "revision":
                    repo = f"{parts[3]}/{parts[4]}"
                    last = [c for c in hub.commits if c.repo == repo]
                    return self._reply(200, {"id": repo, "sha": last[-1].oid if last else "0" * 40, "siblings": []})
                hub.unknown.append(f"GET {self.path}")
                return self._reply(404, {"error": f"not served by the fake hub: {self.path}"})

            def do_POST(self):
                hub.authorizations.append(self.headers.get("Authorization"))
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request.get('organization') or USER}/{request['name']}"
                    with hub.lock:
                        if repo in hub.repos:
                            return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                        hub.repos[repo] = request
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "preupload":
                    files = json.loads(body).get("files", [])
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                        "oid": None} for f in files]})
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "commit":
                    return self._commit(f"{parts[3]}/{parts[4]}", unquote("/".join(parts[6:])), body)
                hub.unknown.append(f"POST {self.path}")
                return self._reply(404, {"error": f"not served by the fake hub: {self.path}"})

            def _commit(self, repo: str, revision: str, body: bytes):
                if hub.commit_delay_s:
                    time.sleep(hub.commit_delay_s)
                if hub.refuse_commits:
                    return self._reply(400, {"error": "commit refused by the fake hub"})
                commit = Commit(repo=repo, revision=revision, summary="")
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        commit.summary = value["summary"]
                    elif item["key"] == "file":
                        content = value["content"]
                        commit.files[value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                                       else content.encode())
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        commit.deleted.append(value["path"])
                    else:
                        hub.unknown.append(f"commit item {item['key']}")
                commit.oid = hashlib.sha1(body).hexdigest()
                with hub.lock:
                    if repo not in hub.repos:
                        return self._reply(404, {"error": f"Repository {repo} not found"})
                    hub.commits.append(commit)
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                                         "pullRequestUrl": None})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commits_to(self, repo: str) -> list[Commit]:
        return [c for c in self.commits if c.repo == repo]


def use_fake_hub(monkeypatch, hub: FakeHub) -> None:
    """Points huggingface_hub at `hub` for one test: HF_ENDPOINT, and offline mode off (tests/conftest.py turns
    it on for the whole suite, and huggingface_hub reads it when imported)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
