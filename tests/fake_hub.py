"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the push_to_hub tests.

It answers the endpoints huggingface_hub's client calls to create a repository and commit files (repo
creation, pre-upload, commit) and keeps what it receives: every commit's message and files, by repository.
Files are always asked to be sent inline ("regular" upload mode), so no large-file storage is involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, user: str = "tester", refuse_commits: bool = False):
        self.user = user
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str]] = []
        self.commit_delay = 0.0  # seconds each commit takes (to keep an upload "in flight")
        self.commit_delays: list[float] = []  # per commit, in arrival order (then commit_delay)
        self.refuse_commits = refuse_commits  # answer every commit with an error 400 (not retried by the client)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload=None):
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _read(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami"):
                    return self._reply(200, {"name": hub.user, "type": "user", "orgs": []})
                match = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/?]+)?(?:\?.*)?$", self.path)
                if match and match.group(1) in hub.repos:
                    repo = hub.repos[match.group(1)]
                    return self._reply(200, {"id": match.group(1), "private": repo["private"], "sha": "0" * 40,
                                             "siblings": [{"rfilename": f} for f in repo["files"]]})
                return self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = self._read()
                hub.requests.append(("POST", self.path))
                if self.path.startswith("/api/validate-yaml"):  # model card metadata check
                    return self._reply(200, {})
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data.get('organization') or hub.user}/{data['name']}"
                    with hub.lock:
                        created = repo_id not in hub.repos
                        # huggingface_hub 1.x sends "private", 2.x "visibility"
                        private = bool(data.get("private")) or data.get("visibility") == "private"
                        hub.repos.setdefault(repo_id, {"private": private, "files": {},
                                                       "commits": []})
                    return self._reply(200 if created else 409, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                match = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/.+$", self.path)
                if match:
                    files = json.loads(body).get("files", [])
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                match = re.match(r"^/api/models/([^/]+/[^/]+)/commit/(.+)$", self.path)
                if match:
                    return self._commit(match.group(1), body, match.group(2))
                return self._reply(404, {"error": "not found"})

            def _commit(self, repo_id: str, body: bytes, revision: str = "main"):
                import time

                with hub.lock:
                    delay = hub.commit_delays.pop(0) if hub.commit_delays else hub.commit_delay
                time.sleep(delay)
                if hub.refuse_commits:
                    return self._reply(400, {"error": "commit refused by the fake hub"})
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._reply(404, {"error": "repository not found"})
                header, files = {}, {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        value = item["value"]
                        files[value["path"]] = base64.b64decode(value["content"])
                with hub.lock:
                    repo["files"].update(files)
                    oid = hashlib.sha1(body).hexdigest()
                    repo["commits"].append({"summary": header.get("summary"), "files": sorted(files), "oid": oid,
                                            "revision": revision})
                return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
