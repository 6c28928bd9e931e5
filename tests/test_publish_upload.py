"""Publishing upload: the real huggingface_hub client against a local stand-in for the Hub API."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from lora_trainer.cli import main
from publish_helpers import FAKE_TOKEN, all_bytes, fake_token  # noqa: F401


# ---- upload, against a local stand-in for the Hub API ------------------------------------------


class _FakeHub(BaseHTTPRequestHandler):
    """Answers the three calls huggingface_hub's create_repo + upload_folder make; records them."""

    requests: list[dict] = []
    committed: dict[str, bytes] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        endpoint = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self._reply(200, {"url": f"{endpoint}/{req['organization']}/{req['name']}"})
        if self.path == "/api/validate-yaml":  # the real Hub checks the card's metadata; so do we
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---\n", 2)[1])
            ok = isinstance(meta, dict) and {"base_model", "license", "tags"} <= set(meta)
            return self._reply(200 if ok else 400, {} if ok else {"errors": [{"message": "bad metadata"}]})
        if "/preupload/" in self.path:  # "regular": content goes inline in the commit, no LFS/xet
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"{endpoint}/alice/geoshape/commit/{'a' * 40}",
                                     "commitOid": "a" * 40, "pullRequestUrl": None})
        return self._reply(404, {"error": f"not implemented: {self.path}"})


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    _FakeHub.requests, _FakeHub.committed = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield _FakeHub
    server.shutdown()
    server.server_close()


def test_upload_creates_the_repo_and_commits_every_file(trained, tmp_path, fake_token, fake_hub, capsys, caplog):
    caplog.set_level("DEBUG")
    out = tmp_path / "repo"
    code = main(["publish", str(trained.output_dir), "--hub", "alice/geoshape", "--private", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    paths = [r["path"] for r in fake_hub.requests]
    assert paths[0] == "/api/repos/create" and "/api/validate-yaml" in paths
    assert json.loads(fake_hub.requests[0]["body"]) == {"name": "geoshape", "organization": "alice",
                                                        "visibility": "private", "type": "model"}
    assert any(p.startswith("/api/models/alice/geoshape/preupload/main") for p in paths)
    assert any(p.startswith("/api/models/alice/geoshape/commit/main") for p in paths)
    assert all(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in fake_hub.requests)
    # the Hub received exactly the folder (bar our manifest), byte for byte
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    assert fake_hub.committed == local
    assert "published: http://127.0.0.1" in printed.out
    # the token went only into the Authorization header
    assert FAKE_TOKEN not in printed.out + printed.err + caplog.text
    for path, data in all_bytes(out):
        assert FAKE_TOKEN.encode() not in data, path


def test_upload_without_a_token_is_a_one_line_error(trained, tmp_path, monkeypatch, fake_hub, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    import huggingface_hub.constants  # read at import: point the saved-login path at nothing

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    code = main(["publish", str(trained.output_dir), "--hub", "alice/geoshape", "--out", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no HuggingFace token") and err.count("\n") == 1
    assert fake_hub.requests == []
    assert not (tmp_path / "repo").exists()  # said before the repo folder is built


def test_upload_in_offline_mode_says_so(trained, tmp_path, monkeypatch, fake_token, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["publish", str(trained.output_dir), "--hub", "alice/geoshape", "--out", str(tmp_path / "repo")])
    out, err = capsys.readouterr()
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and "--dry-run" in err and err.count("\n") == 1
    assert out == "" and not (tmp_path / "repo").exists()  # said before "uploading ..." and the folder


@pytest.mark.parametrize("args, expected", [
    (["publish", "{tmp}", "--hub", "alice/geoshape", "--dry-run"], "config.yaml: not found"),
    (["publish", "{run}", "--hub", "not a repo", "--dry-run", "--out", "{tmp}/o"], "--hub: got 'not a repo'"),
    (["publish", "{run}", "--hub", "a/b", "--dry-run", "--out", "{run}"], "would replace the run folder"),
    (["package", "{run}", "--civitai", "{tmp}/x.tar"], "expected a path ending in .zip"),
    (["package", "{run}", "--civitai", "{tmp}/x.zip", "--weight", "-1"], "--weight: got -1"),
    (["publish", "{run}", "--hub", "a/b", "--dry-run", "--out", "{tmp}/o", "--weight", "2", "--weight-range", "0.3,0.9"],
     "--weight 2 is outside --weight-range 0.3,0.9"),
])
def test_bad_publish_inputs_are_one_line_errors(trained, tmp_path, fake_token, capsys, args, expected):
    args = [a.format(tmp=tmp_path, run=trained.output_dir) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
