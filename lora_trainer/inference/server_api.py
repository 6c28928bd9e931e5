"""AUTOMATIC1111's web API (`--api`) in our terms: its txt2img/img2img JSON read into a `Request` (each
field's type and value checked, one-line errors naming the field), and our results written back in its
shapes (base64 PNGs, `info` as a JSON string). No HTTP here: `server.py` serves these."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from ..errors import ConfigError
from ..pnginfo import GenerationInfo, a1111_parameters, parse_a1111_parameters
from .hires import LANCZOS, upscaler_name
from .schedulers import SAMPLERS, resolve_seed, sampler_key

log = logging.getLogger(__name__)

MAX_SIDE = 2048  # pixels: A1111's largest width, height and hires size; serve --max-side changes it
# field: (JSON type, A1111's default); a null value reads as the default, as A1111's clients send it
COMMON = {
    "prompt": (str, ""), "negative_prompt": (str, ""), "steps": (int, 50), "cfg_scale": (float, 7.0),
    "width": (int, 512), "height": (int, 512), "seed": (int, -1), "sampler_name": (str, None),
    "sampler_index": (str, "Euler"), "scheduler": (str, None), "batch_size": (int, 1), "n_iter": (int, 1),
    "clip_skip": (int, None), "override_settings": (dict, {}), "styles": (list, []),
    "send_images": (bool, True), "save_images": (bool, False),
}
TXT2IMG = {**COMMON, "enable_hr": (bool, False), "hr_scale": (float, 2.0), "hr_upscaler": (str, None),
           "hr_second_pass_steps": (int, 0), "hr_resize_x": (int, 0), "hr_resize_y": (int, 0),
           "denoising_strength": (float, 0.75)}
IMG2IMG = {**COMMON, "init_images": (list, None), "denoising_strength": (float, 0.75), "mask": (str, None),
           "mask_blur": (int, 4), "inpainting_fill": (int, 0), "inpainting_mask_invert": (int, 0),
           "inpaint_full_res": (bool, False), "resize_mode": (int, 0), "include_init_images": (bool, False)}
# Fields A1111 acts on that have no counterpart here: a request asking for them gets a warning in the
# log (the image is drawn without them); their value when they ask for nothing
NOT_DONE = {"restore_faces": False, "tiling": False, "subseed_strength": 0, "script_name": None,
            "alwayson_scripts": {}, "refiner_checkpoint": None, "hr_checkpoint_name": None, "hr_sampler_name": None,
            "hr_prompt": "", "hr_negative_prompt": "", "firstphase_width": 0, "firstphase_height": 0}
# override_settings read here; the others are named in the log
OVERRIDES = ("CLIP_stop_at_last_layers", "sd_model_checkpoint")
# A1111's inpainting_fill values: what fills the masked area before it is redrawn; ours keeps its pixels
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# What check_request and the hires checks call a value, and the field it came from here
FLAG_FIELDS = {"--steps": "steps", "--width": "width", "--height": "height", "--strength": "denoising_strength",
               "--clip-skip": "clip_skip", "--hires-scale": "hr_scale", "--hires-strength": "denoising_strength",
               "--hires-steps": "hr_second_pass_steps", "--hires-upscaler": "hr_upscaler",
               "--scheduler": "sampler_name",
               "--batch-size": "batch_size", "--num-images": "n_iter", "--mask-blur": "mask_blur",
               "--init-image": "init_images", "--mask": "mask"}


def field_message(message: str) -> str:
    """A library error that names a CLI flag, told in the API's field names."""
    for flag in sorted(FLAG_FIELDS, key=len, reverse=True):
        message = message.replace(flag, FLAG_FIELDS[flag])
    return message


@dataclass
class ApiRequest:
    """One txt2img/img2img call: the prompt as sent (LoRA tags and all), our Request for the rest, and
    the fields as understood (A1111 echoes them back as `parameters`)."""

    prompt: str
    request: Any  # generate.Request, its prompt still holding the tags
    parameters: dict[str, Any]
    send_images: bool = True


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 768.0: a client's arithmetic, an integer all the same
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
          or kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "an object"}
        raise ConfigError(f"{name}: {json.dumps(value)[:60]} is not {names[kind]}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name}: {value} is not a finite number")
    return float(value) if kind is float else value


def read_fields(body: dict, fields: dict) -> dict[str, Any]:
    """The known fields' values (defaults filled in), each checked to be of its JSON type."""
    return {name: _typed(body, name, kind, default) for name, (kind, default) in fields.items()}


def _at_least(values: dict, name: str, low, what: str) -> None:
    if values[name] < low:
        raise ConfigError(f"{name}: {values[name]} is not allowed; give {what}")


def sampler_of(name: str, scheduler: str | None) -> str:
    """Our sampler key for A1111's `sampler_name` (its names, ours, k-diffusion's `k_` ones), with its
    separate `scheduler` field (1.9+): Karras picks the Karras variant; a one-line error naming the field."""
    wanted = sampler_key(name).removeprefix("k_").replace("dpmpp", "dpm++").replace("ancestral", "a")
    names = {sampler_key(a1111): key for key, (_, _, a1111) in SAMPLERS.items()}
    key = names.get(wanted, wanted if wanted in SAMPLERS else None)
    if key is None:
        raise ConfigError(f"sampler_name: {name!r} is not known; choose one of "
                          f"{', '.join(a1111 for _, _, a1111 in SAMPLERS.values())}")
    kind = sampler_key(scheduler or "automatic")
    if kind == "karras" and not key.endswith("karras"):
        if f"{key}_karras" not in SAMPLERS:
            raise ConfigError(f"scheduler: {scheduler!r} with {SAMPLERS[key][2]!r} is not offered; Karras sigmas "
                              f"come with {', '.join(a for k, (_, _, a) in SAMPLERS.items() if k.endswith('karras'))}")
        key = f"{key}_karras"
    elif kind not in ("automatic", "karras"):
        log.warning("scheduler %r is not offered: %s draws with its own noise schedule", scheduler, SAMPLERS[key][2])
    return key


def decode_image(text: str, name: str) -> Image.Image:
    """A base64 image (a `data:image/...;base64,` prefix allowed) decoded, or a one-line error naming the field."""
    if not isinstance(text, str):
        raise ConfigError(f"{name}: expected a base64-encoded image string, got {type(text).__name__}")
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name}: not valid base64; send the image file's bytes base64-encoded") from None
    except Exception as exc:  # PIL raises many types for bytes that are no image
        raise ConfigError(f"{name}: the decoded bytes are not an image ({type(exc).__name__}); send a PNG or "
                          "JPEG") from None
    return ImageOps.exif_transpose(image)


def _hires_scale(values: dict) -> float:
    """hr_scale, or the scale hr_resize_x/hr_resize_y (A1111's "Resize width/height to") stand for."""
    rx, ry, w, h = values["hr_resize_x"], values["hr_resize_y"], values["width"], values["height"]
    if not (rx or ry):
        return values["hr_scale"]
    scales = [s for s in (rx / w if rx else None, ry / h if ry else None) if s is not None]
    if len(scales) == 2 and abs(rx - round(w * scales[1])) > 8:
        raise ConfigError(f"hr_resize_x/hr_resize_y: {rx}x{ry} is another shape than {w}x{h} (A1111 would crop); "
                          "give one of them, or hr_scale")
    return scales[0]


def _clip_skip(values: dict, default: int) -> int:
    settings = values["override_settings"]
    if values["clip_skip"] is not None:
        return values["clip_skip"]
    skip = settings.get("CLIP_stop_at_last_layers")
    if skip is None:
        return default
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 1:
        raise ConfigError(f"override_settings.CLIP_stop_at_last_layers: {skip!r} is not allowed; give 1 or more")
    return skip


def warn_not_done(body: dict, kind: str) -> list[str]:
    """Log (and return) one line per field the request sets to something not done here."""
    notes = [f"{name}={json.dumps(body[name])[:40]} is not done here; ignored"
             for name, off in NOT_DONE.items() if body.get(name) not in (None, off)]
    if body.get("styles"):
        notes.append("styles: saved prompt styles are not kept here; put their text in the prompt")
    settings = body.get("override_settings")
    for key in [k for k in settings if k not in OVERRIDES] if isinstance(settings, dict) else ():
        notes.append(f"override_settings.{key} is not kept here; ignored")
    if body.get("save_images"):
        notes.append("save_images: nothing is saved on the server; the response carries the images")
    if kind == "img2img":
        if body.get("mask") and body.get("inpainting_fill") not in (None, 1):
            fill = FILLS.get(body["inpainting_fill"], body["inpainting_fill"])
            notes.append(f"inpainting_fill={body['inpainting_fill']} ({fill}) is not done: the masked area is "
                         "redrawn from the init image's pixels (A1111's 'original')")
        if body.get("mask") and body.get("inpaint_full_res"):
            notes.append("inpaint_full_res (Only masked) is not done: the whole picture is drawn at its size")
        if body.get("resize_mode") not in (None, 0):
            notes.append(f"resize_mode={body['resize_mode']} is not done: the init image is stretched to "
                         "width x height (Just resize)")
        if len(body.get("init_images") or []) > 1:
            notes.append(f"init_images: {len(body['init_images'])} given; the first is drawn from")
    for note in notes:
        log.warning("%s: %s", kind, note)
    return notes


def read_request(body: dict, kind: str, default_clip_skip: int = 1, max_side: int = MAX_SIDE) -> ApiRequest:
    """A txt2img (`kind` "txt2img") or img2img body as a Request; ConfigError naming the field when a
    value cannot be used, or would draw a side over `max_side` pixels. Unknown fields are ignored;
    `warn_not_done` names the meaningful ones."""
    from .generate import Request

    if not isinstance(body, dict):
        raise ConfigError("request body: expected a JSON object of fields")
    values = read_fields(body, TXT2IMG if kind == "txt2img" else IMG2IMG)
    for name, low, what in (("steps", 1, "an integer >= 1"), ("batch_size", 1, "an integer >= 1"),
                            ("n_iter", 1, "an integer >= 1"), ("seed", -1, "-1 (random) or a seed >= 0")):
        _at_least(values, name, low, what)
    for name in ("width", "height"):
        if values[name] <= 0 or values[name] % 8:
            raise ConfigError(f"{name}: {values[name]} is not allowed; give a positive multiple of 8")
    if not 0 <= values["denoising_strength"] <= 1:
        raise ConfigError(f"denoising_strength: {values['denoising_strength']} is not allowed; give 0 to 1")
    warn_not_done(body, kind)
    seed = resolve_seed(values["seed"])
    values["sampler_name"] = values["sampler_name"] or values["sampler_index"]
    sampler = sampler_of(values["sampler_name"], values["scheduler"])
    req = Request(prompt=values["prompt"], negative_prompt=values["negative_prompt"], steps=values["steps"],
                  guidance_scale=values["cfg_scale"], seed=seed, batch_size=values["batch_size"],
                  batch_count=values["n_iter"], width=values["width"], height=values["height"], sampler=sampler,
                  clip_skip=_clip_skip(values, default_clip_skip))
    if kind == "txt2img" and values["enable_hr"]:
        # A1111 upscales in latent space unless told otherwise; its "None" is a plain (Lanczos) resize
        upscaler = values["hr_upscaler"] or "Latent"
        req.hires_upscaler = LANCZOS if upscaler.lower() == "none" else _field(upscaler_name, upscaler, "hr_upscaler")
        req.hires_scale = _hires_scale(values)
        if not req.hires_scale > 1:
            raise ConfigError(f"hr_scale: {req.hires_scale:g} is not allowed; give a number above 1, e.g. 2")
        req.hires_strength = values["denoising_strength"]
        req.hires_steps = values["hr_second_pass_steps"] or None
        _at_least(values, "hr_second_pass_steps", 0, "0 (the steps of the first pass) or more")
    if kind == "img2img":
        _read_images(values, body, req)
    _check_sides(req, max_side)
    parameters = {**values, "seed": values["seed"], "sampler_name": SAMPLERS[sampler][2]}
    if kind == "img2img" and not values["include_init_images"]:
        parameters.update(init_images=None, mask=None)  # as A1111: the images are not sent back
    return ApiRequest(values["prompt"], req, parameters, send_images=values["send_images"])


def _check_sides(req, max_side: int) -> None:
    """A side past `max_side` refused before drawing: one such request would hold the one model for
    minutes or hours, or end in an out-of-memory error, while every other client waits."""
    from .hires import hires_size

    larger = f"the {max_side} pixels this server draws (serve --max-side)"
    for name, side in (("width", req.width), ("height", req.height)):
        if side is not None and side > max_side:
            raise ConfigError(f"{name}: {side} is more than {larger}; give a smaller {name}")
    size = (req.width, req.height) if req.width else req.init_image.size if req.init_image else None
    if req.init_image is not None and max(size) > max_side:
        raise ConfigError(f"init_images[0]: {size[0]}x{size[1]} is more than {larger}; give width and height "
                          "to draw it smaller")
    if req.hires_scale is not None and max(hires_size(size, req.hires_scale)) > max_side:
        w, h = hires_size(size, req.hires_scale)
        raise ConfigError(f"hr_scale: {req.hires_scale:g} makes {w}x{h}, more than {larger}; give a smaller "
                          "hr_scale (or hr_resize_x/hr_resize_y)")


def _field(check, value, name: str):
    try:
        return check(value)
    except ConfigError as exc:
        raise ConfigError(field_message(str(exc)).replace("--hires-upscaler", name)) from None


def _read_images(values: dict, body: dict, req) -> None:
    """init_images[0] (and mask) into `req`: RGB, white mask = repaint (inverted on request)."""
    from ..data.images import mask_channel, to_rgb
    from .images import fit_mask

    images = values["init_images"]
    if not images:
        raise ConfigError("init_images: give one base64-encoded image to draw from")
    # without width/height the result keeps the init image's size; with both, it is resized to them
    given = [name for name in ("width", "height") if body.get(name) is not None]
    if len(given) == 1:
        other = "height" if given == ["width"] else "width"
        raise ConfigError(f"{given[0]}: with init_images give {other} too (the init image is resized to both), "
                          "or neither to keep its size")
    sized = bool(given)
    init = to_rgb(decode_image(images[0], "init_images[0]"))
    req.init_image, req.strength = init, values["denoising_strength"]
    if not sized:
        req.width = req.height = None
    if values["mask"]:
        _at_least(values, "mask_blur", 0, "0 (a hard seam) or more pixels")
        mask = mask_channel(decode_image(values["mask"], "mask"))
        if values["inpainting_mask_invert"]:
            mask = ImageOps.invert(mask)
        fitted = fit_mask(mask, init.size)
        if fitted is None:
            raise ConfigError(f"mask: {mask.width}x{mask.height} is another shape than the {init.width}x{init.height} "
                              "init image; send a mask of its shape")
        req.mask, req.mask_blur = fitted, values["mask_blur"]


def png_base64(image: Image.Image, info: GenerationInfo) -> str:
    """The image as a base64 PNG carrying A1111's `parameters` text, as infer's PNGs do."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", a1111_parameters(info))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=meta)
    return base64.b64encode(out.getvalue()).decode("ascii")


def info_json(api: ApiRequest, results: list, model_name: str | None) -> str:
    """A1111's `info`: a JSON string of the run's settings, the seeds and each image's infotext."""
    first: GenerationInfo = results[0].info
    req = api.request
    seeds = [r.info.seed for r in results]
    return json.dumps({
        "prompt": api.prompt, "all_prompts": [api.prompt] * len(results),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(results),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(results),
        "subseed_strength": 0, "width": first.width, "height": first.height, "sampler_name": first.sampler,
        "cfg_scale": req.guidance_scale, "steps": req.steps, "batch_size": req.batch_size, "restore_faces": False,
        "sd_model_name": model_name, "sd_model_hash": first.model_hash, "sd_vae_name": first.vae_name,
        "sd_vae_hash": first.vae_hash, "denoising_strength": first.denoising_strength, "clip_skip": req.clip_skip,
        "extra_generation_params": first.extra, "index_of_first_image": 0, "styles": [],
        "infotexts": [a1111_parameters(r.info) for r in results], "version": "lora-trainer",
    })


def png_info(body: dict) -> dict[str, Any]:
    """/sdapi/v1/png-info: the image's `parameters` text, its other text chunks, and the text read by
    our parser into A1111's keys (Prompt, Negative prompt, Steps, Sampler, ..., Size-1, Size-2)."""
    if not isinstance(body, dict) or not body.get("image"):
        raise ConfigError("image: give the base64-encoded PNG to read")
    image = decode_image(body["image"], "image")
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop("parameters", "")
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    info = parse_a1111_parameters(text)
    lbw = {name: f":lbw={spec}" for name, spec in info.block_weights.items()}
    tags = " ".join(f"<lora:{name}:{weight:g}{lbw.get(name, '')}>" for name, weight, _ in info.adapters)
    params: dict[str, Any] = {
        "Prompt": f"{info.prompt} {tags}".strip(), "Negative prompt": info.negative_prompt, "Steps": info.steps,
        "Sampler": info.sampler, "CFG scale": info.cfg_scale, "Seed": info.seed, "Size-1": info.width,
        "Size-2": info.height, "Clip skip": info.clip_skip,
    }
    for key, value in (("Model", info.model_name), ("Model hash", info.model_hash), ("VAE", info.vae_name),
                       ("VAE hash", info.vae_hash), ("Denoising strength", info.denoising_strength)):
        if value is not None:
            params[key] = value
    params.update(info.extra)
    return {"info": text, "items": items, "parameters": params}
