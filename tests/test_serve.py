"""`lora-trainer serve`: A1111's web API on a tiny SD1.5, talked to over HTTP with urllib. Each image is
the one `Generator` draws with the same settings; `<lora:NAME:W>` tags are `--lora FILE:W` for one
request; bad requests are one-line 400s naming the field, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.server import Service, load_embedding_dir, make_server
from lora_trainer.pnginfo import parse_a1111_parameters

SMALL = dict(steps=2, width=32, height=32)


@pytest.fixture(scope="module")
def folders(random_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    loras, embeddings = root / "loras", root / "embeddings"
    (loras / "sub").mkdir(parents=True)
    embeddings.mkdir()
    shutil.copy(random_adapters["a"], loras / "a.safetensors")
    shutil.copy(random_adapters["b"], loras / "sub" / "b.safetensors")
    (loras / "old.ckpt").write_bytes(b"pickle")  # never served
    with safe_open(str(random_adapters["a"]), framework="pt") as f:  # a's tensors, trained as "zeta"
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(loras / "z.safetensors"),
                  {**f.metadata(), "ss_output_name": "zeta"})
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    tensors = load_file(str(random_adapters["a"]))  # a pivotal-tuning file: a's LoRA bundling "pivtok"
    save_file({**tensors, "bundle_emb.pivtok.string_to_param.*": vectors + 1}, str(loras / "piv.safetensors"))
    save_file({"emb_params": vectors}, str(embeddings / "mytok.safetensors"))
    save_file({"emb_params": torch.ones(2, 48)}, str(embeddings / "wide.safetensors"))  # another base's width
    return loras, embeddings


@pytest.fixture(scope="module")
def server(tiny_sd15, folders):
    """(base URL, Service) of a server on a free port, in a thread."""
    gen = Generator(tiny_sd15, device="cpu")
    service = Service(gen, folders[0], load_embedding_dir(gen, folders[1]))
    httpd = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", service
    httpd.shutdown()
    httpd.server_close()


def call(server, path: str, body=None, raw: bytes | None = None):
    """(status, decoded JSON) of a GET (no body) or POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server[0] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ok(server, path: str, body=None):
    status, out = call(server, path, body)
    assert status == 200, out
    return out


def images(out) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(text))) for text in out["images"]]


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_same(served: Image.Image, drawn: Image.Image) -> None:
    assert served.size == drawn.size
    assert np.abs(np.asarray(served.convert("RGB"), int) - np.asarray(drawn, int)).max() <= 1


def draw(model, loras=(), embeddings=(), **request):
    return Generator(model, loras, device="cpu", embeddings=embeddings).generate(Request(**request))


def test_txt2img_is_the_generators_image_and_its_infotext_parses_back(server, tiny_sd15, folders):
    body = dict(prompt="a red circle, mytok", negative_prompt="blurry", seed=5.0, sampler_name="DPM++ 2M",
                cfg_scale=6, batch_size=2, override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL,
                restore_faces=False, some_extension_field={"x": 1})  # unknown fields are ignored
    out = ok(server, "/sdapi/v1/txt2img", body)
    drawn = draw(tiny_sd15, embeddings=[folders[1] / "mytok.safetensors"], prompt="a red circle, mytok",
                 negative_prompt="blurry", seed=5, sampler="dpm++_2m", guidance_scale=6, batch_size=2, clip_skip=2,
                 **SMALL)
    served = images(out)
    assert len(served) == 2
    for image, result in zip(served, drawn):
        assert_same(image, result.image)
    info = json.loads(out["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6] and info["prompt"] == body["prompt"]
    assert out["parameters"]["sampler_name"] == "DPM++ 2M" and out["parameters"]["cfg_scale"] == 6
    for k, (text, image) in enumerate(zip(info["infotexts"], served)):
        assert image.info["parameters"] == text  # the PNG carries it, as infer's do
        parsed = parse_a1111_parameters(text)
        assert (parsed.prompt, parsed.negative_prompt, parsed.steps, parsed.sampler, parsed.cfg_scale, parsed.seed,
                parsed.width, parsed.height, parsed.clip_skip) == (
            "a red circle, mytok", "blurry", 2, "DPM++ 2M", 6.0, 5 + k, 32, 32, 2)
        assert [name for name, _ in parsed.embeddings] == ["mytok"]


def test_seed_minus_one_is_drawn_reported_and_reproduces(server):
    out = ok(server, "/sdapi/v1/txt2img", dict(prompt="a cat", seed=-1, sampler_name="Euler a", **SMALL))
    seed = json.loads(out["info"])["seed"]
    assert seed >= 0 and out["parameters"]["seed"] == -1  # as A1111: the request as sent, the seed in info
    again = ok(server, "/sdapi/v1/txt2img", dict(prompt="a cat", seed=seed, sampler_name="Euler a", **SMALL))
    assert_same(images(again)[0], images(out)[0])


def test_a_lora_tag_is_the_lora_flag_for_that_request_only(server, tiny_sd15, folders):
    loras = folders[0]
    common = dict(seed=2, sampler_name="Euler", **SMALL)
    reference = dict(seed=2, sampler="euler", guidance_scale=7.0, **SMALL)
    out = ok(server, "/sdapi/v1/txt2img", dict(prompt="a cat <lora:a:0.5>", **common))
    drawn = draw(tiny_sd15, [f"{loras / 'a.safetensors'}:0.5"], prompt="a cat", **reference)
    assert_same(images(out)[0], drawn[0].image)
    parsed = parse_a1111_parameters(json.loads(out["info"])["infotexts"][0])
    assert parsed.prompt == "a cat" and [(n, w) for n, w, _ in parsed.adapters] == [("a", 0.5)]
    assert parsed.adapters[0][2]  # its hash, as A1111 writes it

    plain = ok(server, "/sdapi/v1/txt2img", dict(prompt="a cat", **common))  # no tag: no adapter
    assert_same(images(plain)[0], draw(tiny_sd15, prompt="a cat", **reference)[0].image)
    assert "<lora:" not in json.loads(plain["info"])["infotexts"][0]

    # another weight and block weights of the loaded file, and a second file from a subfolder
    both = ok(server, "/sdapi/v1/txt2img", dict(prompt="<lora:a:1:lbw=OUTALL> a cat, <lora:b:0.8>", **common))
    drawn = draw(tiny_sd15, [f"{loras / 'a.safetensors'}:1:lbw=OUTALL", f"{loras / 'sub' / 'b.safetensors'}:0.8"],
                 prompt="a cat,", **reference)
    assert_same(images(both)[0], drawn[0].image)
    assert set(server[1].gen.adapters.specs) == {"a", "b"}  # each file loaded once


def test_a_bundled_embedding_is_a_word_only_in_the_requests_naming_its_lora(server, tiny_sd15, folders):
    common = dict(seed=2, sampler_name="Euler", **SMALL)
    reference = dict(prompt="a pivtok photo", seed=2, sampler="euler", guidance_scale=7.0, **SMALL)
    out = ok(server, "/sdapi/v1/txt2img", dict(prompt="a pivtok photo <lora:piv:0.6>", **common))
    assert_same(images(out)[0], draw(tiny_sd15, [f"{folders[0] / 'piv.safetensors'}:0.6"], **reference)[0].image)
    assert "TI hashes: \"pivtok: piv\"" in json.loads(out["info"])["infotexts"][0]
    plain = ok(server, "/sdapi/v1/txt2img", dict(prompt="a pivtok photo", **common))
    assert_same(images(plain)[0], draw(tiny_sd15, **reference)[0].image)  # pivtok is plain text again


def test_requests_at_once_are_drawn_one_at_a_time(server):
    """Two clients at once, with the same file at other weights: each gets its own weight's image."""
    bodies = [dict(prompt=f"a cat <lora:a:{w}>", seed=3, sampler_name="Euler", **SMALL) for w in (0.2, 1.5)]
    alone = [images(ok(server, "/sdapi/v1/txt2img", body))[0] for body in bodies]
    together: dict[int, Image.Image] = {}
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(
        k, images(ok(server, "/sdapi/v1/txt2img", bodies[k % 2]))[0])) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, image in together.items():
        assert_same(image, alone[k % 2])


def test_fields_not_done_here_are_named_in_the_log(server, caplog):
    init = [b64(Image.new("RGB", (32, 32)))]
    mask = b64(Image.new("L", (32, 32), 255))
    with caplog.at_level("WARNING", logger="lora_trainer.inference"):
        ok(server, "/sdapi/v1/txt2img", dict(prompt="x", negative_prompt="<lora:a:1>", restore_faces=True,
                                             styles=["cinematic"], override_settings={"sd_vae": "x.pt"},
                                             seed=1, sampler_name="Euler", **SMALL))
        ok(server, "/sdapi/v1/img2img", dict(prompt="x", init_images=init * 2, mask=mask, inpainting_fill=0,
                                             resize_mode=1, seed=1, sampler_name="Euler", **SMALL))
    text = caplog.text
    for said in ("restore_faces=true is not done", "override_settings.sd_vae is not kept", "styles:",
                 "negative prompt's are encoded as text", "inpainting_fill=0 (fill) is not done", "resize_mode=1",
                 "init_images: 2 given"):
        assert said in text, text


def test_img2img_and_inpainting_are_the_generators(server, tiny_sd15):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 40))
    mask.paste(255, (0, 0, 16, 40))
    common = dict(prompt="a dog", seed=4, sampler_name="Euler", steps=4, denoising_strength=0.6)
    reference = dict(prompt="a dog", seed=4, sampler="euler", steps=4, guidance_scale=7.0, strength=0.6)
    out = ok(server, "/sdapi/v1/img2img", dict(init_images=["data:image/png;base64," + b64(init)], **common))
    assert_same(images(out)[0], draw(tiny_sd15, init_image=init, **reference)[0].image)  # the init image's size
    assert out["parameters"]["init_images"] is None

    sized = ok(server, "/sdapi/v1/img2img", dict(init_images=[b64(init)], width=48, height=48, **common))
    assert_same(images(sized)[0], draw(tiny_sd15, init_image=init, width=48, height=48, **reference)[0].image)

    inpainted = ok(server, "/sdapi/v1/img2img", dict(init_images=[b64(init)], mask=b64(mask), mask_blur=2,
                                                     inpainting_fill=1, **common))
    drawn = draw(tiny_sd15, init_image=init, mask=mask, mask_blur=2, **reference)[0]
    assert_same(images(inpainted)[0], drawn.image)
    parsed = parse_a1111_parameters(json.loads(inpainted["info"])["infotexts"][0])
    assert parsed.denoising_strength == 0.6 and parsed.extra["Mask blur"] == "2"


def test_the_hires_fields_are_the_hires_fix(server, tiny_sd15):
    body = dict(prompt="a boat", seed=1, sampler_name="Euler", enable_hr=True, hr_scale=2, hr_second_pass_steps=3,
                denoising_strength=0.6, **SMALL)
    out = ok(server, "/sdapi/v1/txt2img", body)  # no hr_upscaler: A1111's default, Latent
    drawn = draw(tiny_sd15, prompt="a boat", seed=1, sampler="euler", guidance_scale=7.0, hires_scale=2,
                 hires_steps=3, hires_strength=0.6, hires_upscaler="Latent", **SMALL)[0]
    assert images(out)[0].size == (64, 64)
    assert_same(images(out)[0], drawn.image)
    parsed = parse_a1111_parameters(json.loads(out["info"])["infotexts"][0])
    assert (parsed.width, parsed.extra["Hires upscale"], parsed.extra["Hires upscaler"], parsed.extra["Hires steps"],
            parsed.denoising_strength) == (32, "2", "Latent", "3", 0.6)

    lanczos = ok(server, "/sdapi/v1/txt2img", {**body, "hr_upscaler": "None", "hr_scale": None, "hr_resize_x": 48})
    drawn = draw(tiny_sd15, prompt="a boat", seed=1, sampler="euler", guidance_scale=7.0, hires_scale=1.5,
                 hires_steps=3, hires_strength=0.6, **SMALL)[0]
    assert_same(images(lanczos)[0], drawn.image)


def test_the_listing_endpoints(server, folders):
    [model] = ok(server, "/sdapi/v1/sd-models")
    assert model["title"] == model["model_name"] == "model"
    loras = ok(server, "/sdapi/v1/loras")
    assert [(item["name"], item["alias"], item["path"]) for item in loras] == [
        ("a", "a", str(folders[0] / "a.safetensors")), ("piv", "piv", str(folders[0] / "piv.safetensors")),
        ("b", "b", str(folders[0] / "sub" / "b.safetensors")), ("z", "zeta", str(folders[0] / "z.safetensors"))]
    assert loras[3]["metadata"]["ss_output_name"] == "zeta" and "ss_network_dim" in loras[0]["metadata"]
    names = [s["name"] for s in ok(server, "/sdapi/v1/samplers")]
    assert {"DPM++ 2M", "Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names)
    embeddings = ok(server, "/sdapi/v1/embeddings")
    assert embeddings["loaded"] == {"mytok": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": 32, "vectors": 2}}
    assert list(embeddings["skipped"]) == ["wide"]
    assert ok(server, "/sdapi/v1/options")["sd_model_checkpoint"] == "model"


def test_a_tag_may_name_a_file_by_its_alias(server):
    by_stem, by_alias = (ok(server, "/sdapi/v1/txt2img", dict(prompt=f"a cat <lora:{name}:0.5>", seed=2,
                                                             sampler_name="Euler", **SMALL)) for name in ("a", "zeta"))
    assert_same(images(by_alias)[0], images(by_stem)[0])  # z.safetensors holds a's tensors
    assert "<lora:z:0.5>" in json.loads(by_alias["info"])["infotexts"][0]


def test_options_set_the_clip_skip_and_refuse_another_model(server, tiny_sd15):
    ok(server, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"})
    try:
        out = ok(server, "/sdapi/v1/txt2img", dict(prompt="a cat", seed=1, sampler_name="Euler", **SMALL))
        assert parse_a1111_parameters(json.loads(out["info"])["infotexts"][0]).clip_skip == 2
    finally:
        ok(server, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1})
    status, out = call(server, "/sdapi/v1/options", {"sd_model_checkpoint": "other.safetensors"})
    assert status == 400 and out["detail"].startswith("sd_model_checkpoint:")


def test_png_info_reads_a_served_image_back(server):
    out = ok(server, "/sdapi/v1/txt2img", dict(prompt="a fox <lora:a:0.7>", negative_prompt="dull", seed=9,
                                               sampler_name="Euler", **SMALL))
    info = ok(server, "/sdapi/v1/png-info", {"image": out["images"][0]})
    assert info["info"] == json.loads(out["info"])["infotexts"][0]
    params = info["parameters"]
    assert (params["Prompt"], params["Negative prompt"], params["Steps"], params["Seed"], params["Size-1"],
            params["Sampler"]) == ("a fox <lora:a:0.7>", "dull", 2, 9, 32, "Euler")
    assert ok(server, "/sdapi/v1/png-info", {"image": b64(Image.new("RGB", (8, 8)))})["info"] == ""


def _init() -> list[str]:
    return [b64(Image.new("RGB", (32, 32)))]


@pytest.mark.parametrize("body, field", [
    ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"),
    ({"enable_hr": True, "hr_second_pass_steps": 1001}, "hr_second_pass_steps"),
    ({"width": 33}, "width"), ({"steps": "2"}, "steps"), ({"cfg_scale": "high"}, "cfg_scale"),
    ({"seed": 1.5}, "seed"), ({"sampler_name": "DPM++ 9M"}, "sampler_name"), ({"batch_size": True}, "batch_size"),
    ({"enable_hr": True, "hr_scale": 1}, "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"clip_skip": 13}, "clip_skip"),
    ({"prompt": "<lora:nothere:1>"}, "prompt"), ({"prompt": "<lora:a:strong>"}, "prompt"),
    ({"init_images": ["not base64!"]}, "init_images[0]"),
    ({"init_images": [base64.b64encode(b"text").decode()]}, "init_images[0]"), ({"init_images": []}, "init_images"),
    ({"init_images": _init(), "denoising_strength": 1.5}, "denoising_strength"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, "override_settings.sd_model_checkpoint"),
    ({"init_images": _init(), "mask": "%%%"}, "mask"),
    ({"init_images": _init(), "mask": b64(Image.new("L", (16, 32)))}, "mask"), ({"init_images": _init(), "width": 48}, "width"),
    # sizes past --max-side (2048) drew for hours or failed out of memory while other clients waited
    ({"width": 100000, "height": 64}, "width"), ({"height": 2056}, "height"),
    ({"enable_hr": True, "width": 1536, "height": 64, "hr_scale": 2}, "hr_scale"),
    ({"init_images": [b64(Image.new("RGB", (2056, 8)))], "width": None, "height": None}, "init_images[0]"),
])
def test_a_bad_request_is_a_one_line_400_naming_the_field(server, body, field):
    path = "/sdapi/v1/img2img" if "init_images" in body else "/sdapi/v1/txt2img"
    body = {"prompt": "x", **SMALL, **body}
    body = {k: v for k, v in body.items() if v is not None}  # null: the field left out
    if field == "width" and "init_images" in body:
        del body["height"]  # one of width/height with an init image
    status, out = call(server, path, body)
    assert status == 400, out
    assert out["detail"].startswith(f"{field}") and "\n" not in out["detail"], out
    ok(server, "/sdapi/v1/txt2img", dict(prompt="x", seed=1, sampler_name="Euler", **SMALL))  # still serving


def test_max_side_is_the_servers_own(server, monkeypatch):
    status, out = call(server, "/sdapi/v1/txt2img", dict(prompt="x", **{**SMALL, "width": 40}))
    assert status == 200, out
    monkeypatch.setattr(server[1], "max_side", 32)
    status, out = call(server, "/sdapi/v1/txt2img", dict(prompt="x", **{**SMALL, "width": 40}))
    assert status == 400 and out["detail"] == ("width: 40 is more than the 32 pixels this server draws "
                                               "(serve --max-side); give a smaller width"), out


def test_bad_bodies_unknown_paths_and_server_errors(server, monkeypatch):
    status, out = call(server, "/sdapi/v1/txt2img", raw=b"{not json")
    assert status == 400 and out["detail"].startswith("request body: not JSON")
    assert call(server, "/sdapi/v1/txt2img", [1, 2])[0] == 400
    assert call(server, "/sdapi/v1/nothing")[0] == 404
    assert call(server, "/sdapi/v1/txt2img")[0] == 405  # a GET of a POST endpoint

    def broken(request):
        raise RuntimeError("the device fell over\nsecond line")

    monkeypatch.setattr(server[1].gen, "generate", broken)
    status, out = call(server, "/sdapi/v1/txt2img", dict(prompt="x", **SMALL))
    assert status == 500 and out["error"] == "RuntimeError" and "\n" not in out["detail"]
    assert out["detail"].startswith("the device fell over") and "Traceback" not in json.dumps(out)
    monkeypatch.undo()
    ok(server, "/sdapi/v1/txt2img", dict(prompt="x", seed=1, sampler_name="Euler", **SMALL))
