"""A tiny stand-in for the Hugging Face Hub on loopback: the few endpoints
``huggingface_hub.snapshot_download`` calls (repo info, the file tree, each file's resolve
URL), a gated repo that wants a token, and a request log. Runs in a thread (the client under
test is synchronous or a subprocess); point ``HF_ENDPOINT`` at :attr:`FakeHub.url`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False  # needs the token below
    lfs: tuple[str, ...] = ()  # files served as LFS objects (sha256 etag)


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    token: str = "hf_fake_token_for_tests"
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def send(self, status: int, body: bytes, headers: dict[str, str],
                     head: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def error(self, status: int, code: str, message: str, head: bool) -> None:
                self.send(status, json.dumps({"error": message}).encode(),
                          {"Content-Type": "application/json", "X-Error-Code": code,
                           "X-Error-Message": message}, head)

            def answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                found = self.find(path)
                if found is None:
                    self.error(404, "RepositoryNotFound", "Repository not found", head)
                    return
                name, repo, rest = found
                if repo.gated and self.headers.get("authorization") != f"Bearer {hub.token}":
                    self.error(401 if "authorization" not in self.headers else 403, "GatedRepo",
                               f"Access to model {name} is restricted. You must have access "
                               "to it and be authenticated to access it. Please log in.", head)
                    return
                if rest[0] == "api":
                    self.api(repo, name, rest[1:], head)
                else:
                    self.resolve(repo, rest[1:], head)

            def find(self, path: str) -> tuple[str, Repo, list[str]] | None:
                parts = path.strip("/").split("/")
                api = parts[:2] == ["api", "models"]
                owner_at = 2 if api else 0
                name = "/".join(parts[owner_at: owner_at + 2])
                repo = hub.repos.get(name)
                if repo is None:
                    return None
                rest = parts[owner_at + 2:]
                if api:
                    return name, repo, ["api", *rest]
                if len(rest) < 3 or rest[0] != "resolve":
                    return None
                return name, repo, rest

            def api(self, repo: Repo, name: str, rest: list[str], head: bool) -> None:
                if rest[:1] == ["tree"]:
                    tree = [{"type": "file", "path": p, "size": len(d), "oid": git_sha(d),
                             **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d),
                                         "pointerSize": 130}} if p in repo.lfs else {})}
                            for p, d in sorted(repo.files.items())]
                    body = tree
                else:  # repo info (revision/<rev>, or none)
                    body = {"id": name, "modelId": name, "sha": repo.commit, "private": False,
                            "gated": "auto" if repo.gated else False,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
                self.send(200, json.dumps(body).encode(), {"Content-Type": "application/json"},
                          head)

            def resolve(self, repo: Repo, rest: list[str], head: bool) -> None:
                filename = "/".join(rest[1:])
                data = repo.files.get(filename)
                if data is None:
                    self.error(404, "EntryNotFound", "Entry not found", head)
                    return
                etag = hashlib.sha256(data).hexdigest() if filename in repo.lfs else git_sha(data)
                self.send(200, data, {"Content-Type": "application/octet-stream",
                                      "ETag": f'"{etag}"', "X-Repo-Commit": repo.commit,
                                      **({"X-Linked-Etag": f'"{etag}"',
                                          "X-Linked-Size": str(len(data))}
                                         if filename in repo.lfs else {})}, head)

        return Handler

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeHub]:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)
