"""Loading bases (SD1.5 / SDXL, hub id or diffusers folder), ControlNets and the SDXL refiner, and
the diffusers pipeline class for each job. Job pipelines share the base's modules (`from_pipe`),
so adapters loaded once apply to txt2img, img2img, inpainting and ControlNet alike."""

from __future__ import annotations


import torch

from ..models.loading import check_source, diffusers_dtype, is_single_file
from ..models.vae import check_vae_fits, check_vae_source, load_vae

from ..errors import ConfigError, ModelError, first_line
from .adapters import quiet_diffusers

JOBS = ("txt2img", "img2img", "inpaint")

# (variant, job, with ControlNet) → diffusers pipeline class name
PIPELINES = {
    ("sd15", "txt2img", False): "StableDiffusionPipeline",
    ("sd15", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd15", "inpaint", False): "StableDiffusionInpaintPipeline",
    ("sd15", "txt2img", True): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img", False): "StableDiffusionXLPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "txt2img", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
}


def default_device_dtype(device: str | None, dtype: torch.dtype | None) -> tuple[str, torch.dtype]:
    """CUDA in fp16 when there is a GPU, else the CPU in fp32 (fp16 on CPU is slow and lossy)."""
    from ..processes import check_device

    device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return device, dtype


def load_base(model: str, device: str, dtype: torch.dtype, flag: str = "--model", config_dir: str | None = None,
              vae: str | None = None):
    """(pipeline, variant) for an SD1.x/2.x or SDXL base; the variant comes from model_index.json.
    `vae` (a VAE file, folder or hub id) replaces the base's own VAE once it is known to fit."""
    import diffusers

    check_source(model, flag)
    if vae:
        check_vae_source(vae, "--vae")  # a missing VAE is named before the base loads
    if is_single_file(model):
        try:
            pipe, variant = _load_single_file(model, dtype, config_dir)
        except ModelError as exc:  # the loader speaks in config keys; here they are flags
            raise ModelError(str(exc).replace("model.base", flag).replace("model.config_dir", "--config-dir")) from None
    else:
        try:
            index = diffusers.DiffusionPipeline.load_config(model)
            variant = "sdxl" if "text_encoder_2" in index or "XL" in index.get("_class_name", "") else "sd15"
            cls = getattr(diffusers, PIPELINES[(variant, "txt2img", False)])
            extra = {"safety_checker": None, "requires_safety_checker": False} if variant == "sd15" else {}
            with quiet_diffusers():
                pipe = cls.from_pretrained(model, **diffusers_dtype(dtype), **extra)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{flag}: cannot load {model!r}: {first_line(exc)}") from None
    if vae:
        pipe.register_modules(vae=load_vae(vae, pipe.vae, dtype, "--vae"))
    with quiet_diffusers():
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, variant


def _load_single_file(model: str, dtype: torch.dtype, config_dir: str | None = None):
    """An original-layout checkpoint (what CivitAI and A1111 users have) through the trainer's own
    single-file loader, with the shipped SD1.5/SDXL configs: no network."""
    import diffusers

    from ..models.single_file import detect_single_file_variant, load_single_file

    variant = detect_single_file_variant(model)
    parts, scheduler_config = load_single_file(model, variant, dtype, config_dir)
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    cls = getattr(diffusers, PIPELINES[(variant, "txt2img", False)])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if variant == "sd15" else {}
    return cls(**parts, scheduler=scheduler, **extra), variant


def load_controlnet(model: str, device: str, dtype: torch.dtype):
    from diffusers import ControlNetModel

    check_source(model, "--controlnet", single_file_ok=False, index_file="config.json")
    try:
        with quiet_diffusers():
            net = ControlNetModel.from_pretrained(model, **diffusers_dtype(dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"--controlnet: cannot load {model!r}: {first_line(exc)}") from None
    return net.to(device)


def _family(unet_config) -> str:
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def check_controlnet_fits(net, pipe, variant: str, model: str) -> None:
    """A ControlNet for another base family (or another text encoder width) fails deep inside the
    UNet's first step with a shape error; name the mismatch instead."""
    names = {"sd15": "SD 1.x", "sdxl": "SDXL"}
    family = _family(net.config)
    if family != variant:
        raise ModelError(f"--controlnet: {model} is a ControlNet for {names[family]}, but --model is "
                         f"{names[variant]}; use a ControlNet trained for {names[variant]}")
    want, have = pipe.unet.config.cross_attention_dim, net.config.cross_attention_dim
    if want != have:
        raise ModelError(f"--controlnet: {model} reads text features of width {have}, but this base's are {want}; "
                         "it was trained for another base (e.g. SD 2.x)")


def load_refiner(model: str, base_pipe, device: str, dtype: torch.dtype, vae: str | None = None):
    """The SDXL refiner as an img2img pipeline. With `vae` (the --vae the base loaded), the refiner
    decodes with that VAE too: the refiner finishes the image, so a VAE for the base alone would
    never draw a pixel; it must fit the refiner's own VAE as it fits the base's."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    check_source(model, "--refiner", single_file_ok=False)
    try:
        with quiet_diffusers():
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model, **diffusers_dtype(dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"--refiner: cannot load {model!r}: {first_line(exc)}") from None
    if getattr(pipe, "text_encoder_2", None) is None or _family(pipe.unet.config) != "sdxl":
        raise ModelError(f"--refiner: {model} is not an SDXL refiner (an SDXL img2img model with text_encoder_2); "
                         "use e.g. stabilityai/stable-diffusion-xl-refiner-1.0")
    if vae:
        check_vae_fits(base_pipe.vae, pipe.vae, vae, "--vae", against=f"the refiner's ({model}) VAE")
        pipe.register_modules(vae=base_pipe.vae)
    with quiet_diffusers():
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job_pipeline(base_pipe, variant: str, job: str, controlnet=None):
    """The pipeline for `job` on the same modules as `base_pipe` (no weights are copied)."""
    import diffusers

    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, not {job!r}")
    cls = getattr(diffusers, PIPELINES[(variant, job, controlnet is not None)])
    if type(base_pipe) is cls:
        return base_pipe
    extra = {"controlnet": controlnet} if controlnet is not None else {}
    with quiet_diffusers():
        pipe = cls.from_pipe(base_pipe, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoders_of(pipe) -> list[tuple[object, torch.nn.Module]]:
    """The (tokenizer, text encoder) pairs a pipeline has: one for SD1.x, two for SDXL, only the
    second for the SDXL refiner."""
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def check_clip_skip(pipe, clip_skip: int, flag: str = "--clip-skip") -> None:
    """A clip skip past the layers of `pipe`'s text encoder (the base's, or the refiner's), in one line."""
    from ..textencode import max_clip_skip

    most = max_clip_skip([encoder for _, encoder in encoders_of(pipe)])
    if clip_skip > most:
        raise ConfigError(f"{flag}: got {clip_skip}; expected 1 to {most} "
                          f"(this model's text encoder has {most} layers)")
