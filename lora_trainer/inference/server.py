"""`lora-trainer serve`: AUTOMATIC1111's web API (its `--api` endpoints and JSON shapes) over one
Generator, on the standard library's HTTP server. Requests are drawn one at a time (one model on one
device); a bad request gets a 400 naming the field, anything else a 500, both one line of JSON, and
the server goes on serving."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LoraTrainerError
from .schedulers import SAMPLERS

log = logging.getLogger(__name__)
MAX_BODY = 256 << 20  # bytes: a few large base64 images fit, a runaway upload does not


class Service:
    """What the endpoints do, HTTP aside: one Generator, its LoRA folder and embeddings, and the lock
    that keeps requests from drawing at the same time."""

    def __init__(self, gen, lora_dir: Path | None = None, skipped: dict | None = None, max_side: int | None = None):
        from .server_api import MAX_SIDE
        from .server_loras import LoraLibrary

        self.gen, self.loras = gen, LoraLibrary(lora_dir, gen)
        self.skipped = skipped or {}  # embeddings that do not fit the base: {token: its file's embedding}
        self.clip_skip = 1  # A1111's CLIP_stop_at_last_layers option, set by POST /sdapi/v1/options
        self.lock = threading.Lock()
        self.max_side = max_side or MAX_SIDE  # pixels: no request draws a larger side (or hires size)

    @property
    def model_title(self) -> str:
        return Path(self.gen.model).name or self.gen.model

    def generate(self, body: Any, kind: str) -> dict:
        """txt2img / img2img: the images (base64 PNGs), the request as understood, and `info`."""
        from .server_api import info_json, png_base64, read_request
        from .server_loras import TAG, parse_tags

        api = read_request(body, kind, self.clip_skip, self.max_side)
        checkpoint = api.parameters["override_settings"].get("sd_model_checkpoint")
        if checkpoint not in (None, self.model_title, self.gen.model):  # A1111 would load it: say it cannot
            raise ConfigError(f"override_settings.sd_model_checkpoint: {checkpoint!r}: this server serves "
                              f"{self.model_title} only; start another with --model to serve another")
        api.request.prompt, tags = parse_tags(api.prompt)
        if TAG.search(api.request.negative_prompt):  # A1111 reads the prompt's alone, the same way
            log.warning("%s: <lora:...> tags are read from the prompt only; the negative prompt's are encoded as "
                        "text", kind)
        with self.lock:  # the adapters' weights are the model's: one request sets and draws at a time
            self.loras.apply(tags)
            results = self.gen.generate(api.request)
        images = [png_base64(r.image, r.info) for r in results] if api.send_images else []
        return {"images": images, "parameters": api.parameters,
                "info": info_json(api, results, self.model_title)}

    def sd_models(self) -> list[dict]:
        model = self.gen.model
        return [{"title": self.model_title, "model_name": Path(model).stem or model, "hash": None, "sha256": None,
                 "filename": str(Path(model).resolve()) if Path(model).exists() else model, "config": None}]

    def samplers(self) -> list[dict]:
        return [{"name": a1111, "aliases": [key], "options": {}} for key, (_, _, a1111) in SAMPLERS.items()]

    def embeddings(self) -> dict:
        def described(e) -> dict:
            width = next(iter(e.parts.values())).shape[1]
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                    "vectors": e.vectors}

        return {"loaded": {e.token: described(e) for e in self.gen.embeddings},
                "skipped": {token: described(e) for token, e in self.skipped.items()}}

    def options(self) -> dict:
        return {"sd_model_checkpoint": self.model_title, "sd_vae": self.gen.vae_fields.get("vae_name") or "Automatic",
                "CLIP_stop_at_last_layers": self.clip_skip, "samples_format": "png"}

    def set_options(self, body: Any) -> dict:
        """POST /sdapi/v1/options: CLIP_stop_at_last_layers is kept (the default clip skip); another
        checkpoint or VAE than the loaded one is refused; other options are ignored, with a log line."""
        if not isinstance(body, dict):
            raise ConfigError("request body: expected a JSON object of options")
        for key, value in body.items():
            if key == "CLIP_stop_at_last_layers":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"CLIP_stop_at_last_layers: {value!r} is not allowed; give 1 or more")
                self.clip_skip = value
            elif key == "sd_model_checkpoint" and value not in (self.model_title, self.gen.model):
                raise ConfigError(f"sd_model_checkpoint: {value!r}: this server serves {self.model_title} only; "
                                  "start another with --model to serve another")
            elif key not in ("sd_model_checkpoint",):
                log.warning("options: %s is not kept here; ignored", key)
        return {}

    def png_info(self, body: Any) -> dict:
        from .server_api import png_info

        return png_info(body)


def _routes(service: Service) -> dict[tuple[str, str], Any]:
    return {
        ("POST", "/sdapi/v1/txt2img"): lambda body: service.generate(body, "txt2img"),
        ("POST", "/sdapi/v1/img2img"): lambda body: service.generate(body, "img2img"),
        ("POST", "/sdapi/v1/png-info"): service.png_info,
        ("POST", "/sdapi/v1/options"): service.set_options,
        ("GET", "/sdapi/v1/options"): lambda _: service.options(),
        ("GET", "/sdapi/v1/sd-models"): lambda _: service.sd_models(),
        ("GET", "/sdapi/v1/loras"): lambda _: service.loras.listing(),
        ("GET", "/sdapi/v1/samplers"): lambda _: service.samplers(),
        ("GET", "/sdapi/v1/embeddings"): lambda _: service.embeddings(),
    }


class Handler(BaseHTTPRequestHandler):
    """One HTTP request: JSON in, JSON out; errors as {"error": ..., "detail": one line}."""

    routes: dict = {}  # set on the subclass `make_server` builds
    server_version = "lora-trainer"

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        from .server_api import field_message

        path = self.path.split("?", 1)[0].rstrip("/")
        route = self.routes.get((method, path))
        try:
            if route is None:
                known = any(p == path for _, p in self.routes)
                status = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
                return self._send(status, {"error": status.phrase, "detail": f"{method} {path}: no such endpoint"})
            self._send(HTTPStatus.OK, route(self._body() if method == "POST" else None))
        except LoraTrainerError as exc:  # the request's fault: say what to change
            self._send(HTTPStatus.BAD_REQUEST, {"error": type(exc).__name__,
                                                "detail": field_message(str(exc)).splitlines()[0]})
        except Exception as exc:  # ours: the traceback goes to the log, not to the client
            log.exception("%s %s failed", method, path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": type(exc).__name__, "detail": (str(exc).strip().splitlines() or ["server error"])[0]
                        + " (the server's log has the details)"})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ConfigError(f"request body: {length} bytes is more than the {MAX_BODY >> 20} MiB accepted")
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError as exc:
            raise ConfigError(f"request body: not JSON ({exc})") from None

    def _send(self, status: HTTPStatus, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def make_server(service: Service, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """An HTTP server for `service`, bound (port 0: a free one, see `server.server_address`), not started."""
    handler = type("ServiceHandler", (Handler,), {"routes": _routes(service)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_embedding_dir(gen, folder: Path | None) -> dict:
    """Load every embedding file in `folder` (subfolders too) under its stem, as A1111 does; those made
    for another base are skipped with a log line ({token: embedding}); pickles are not read."""
    from ..errors import ModelError
    from ..export.files import PICKLE_SUFFIXES
    from .embeddings import EmbeddingSpec, read_embedding

    skipped: dict = {}
    if folder is None:
        return skipped
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            log.warning("--embedding-dir: %s is a pickle, not read (it could run code); save it as .safetensors", path)
            continue
        if path.suffix.lower() != ".safetensors":
            continue
        try:
            embedding = read_embedding(EmbeddingSpec(path))
        except ModelError as exc:
            log.warning("%s", exc)
            continue
        try:
            gen.load_embedding(embedding)
        except ModelError as exc:  # made for another base, or a token already taken
            log.warning("--embedding-dir: %s skipped: %s", path.name, exc)
            skipped[embedding.token] = embedding
    return skipped


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .command import DTYPES, VAE_HELP

    p.add_argument("--model", required=True, help="base: hub id, diffusers folder or single-file .safetensors")
    p.add_argument("--config-dir", default=None, help="as infer's: configs for a single-file --model")
    p.add_argument("--vae", default=None, help=VAE_HELP)
    p.add_argument("--lora-dir", default=None, help="folder of LoRA files prompts name as <lora:NAME:WEIGHT>")
    p.add_argument("--embedding-dir", default=None, help="folder of embeddings, each loaded under its file's stem")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="A1111's port by default")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles (as infer)")
    p.add_argument("--max-side", type=int, default=None,
                   help="largest width, height or hires size a request may ask for (default 2048, as A1111)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")


def _folder(value: str | None, flag: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "not found"
        raise ConfigError(f"{flag}: {value}: {what}; give a folder")
    return path


def run_serve(args, ready=None) -> int:
    """Check the flags, load the model, serve until Ctrl-C. `ready(server)` is called once listening."""
    from .command import DTYPES
    from .generate import Generator

    lora_dir, embedding_dir = _folder(args.lora_dir, "--lora-dir"), _folder(args.embedding_dir, "--embedding-dir")
    if args.max_side is not None and (args.max_side < 8 or args.max_side % 8):
        raise ConfigError(f"--max-side: {args.max_side} is not allowed; give a positive multiple of 8, e.g. 4096")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a port; give 1 to 65535 (0: any free one)")
    gen = Generator(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                    config_dir=args.config_dir, vae=args.vae, vae_tiling=args.vae_tiling)
    service = Service(gen, lora_dir, load_embedding_dir(gen, embedding_dir), args.max_side)
    try:
        server = make_server(service, args.host, args.port)
    except OSError as exc:
        raise ConfigError(f"--port: {args.host}:{args.port}: {exc.strerror}; give another --port") from None
    host, port = server.server_address[:2]
    print(f"serving {service.model_title} at http://{host}:{port} (A1111 API: /sdapi/v1/...); Ctrl-C stops",
          flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
