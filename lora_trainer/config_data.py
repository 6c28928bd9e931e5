"""The `data` section of the run config (with its `data.caption` subsection): the images, their
captions and how they are read. Declared here to keep config.py short; config.py re-exports both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .config_subsets import SubsetConfig

# The model each captioning method uses when data.caption.model is null.
DEFAULT_CAPTION_MODELS = {"blip2": "Salesforce/blip2-opt-2.7b", "wd14": "SmilingWolf/wd-vit-tagger-v3"}


@dataclass
class CaptionConfig:
    """Captions generated for images that have none (BLIP-2 sentences or WD14 booru tags), written
    as sidecar files (`<stem><data.caption_extension>`, .txt by default)."""

    # none: images without a caption train on the empty one; blip2: a sentence ("a dog on a beach");
    # wd14: SmilingWolf's WD14 tagger, booru tags ("1girl, solo, long hair, smile"; needs onnxruntime)
    method: Literal["none", "blip2", "wd14"] = "none"
    # hub id or folder: a BLIP-2 model and processor, or for wd14 a folder (or hub repo) holding
    # model.onnx and selected_tags.csv; null: Salesforce/blip2-opt-2.7b or SmilingWolf/wd-vit-tagger-v3
    model: Optional[str] = None
    # Written into each generated file (so they show and can be edited there); hand-written captions
    # are left alone. data.caption_prefix, by contrast, is added at training time to every caption.
    prefix: str = ""  # e.g. a trigger "sks dog, "
    suffix: str = ""  # e.g. ", in the style of mystyle"
    # re-caption images that have a caption file (the old one kept as e.g. .txt.bak); metadata.jsonl is never touched
    overwrite: bool = False
    batch_size: int = 8
    prompt: str = ""  # text the caption continues, e.g. "a photo of", or "Question: ... Answer:"
    keep_prompt: bool = True  # start the caption with the prompt; false for question prompts
    max_length: int = 40  # most new tokens per caption
    min_length: int = 5  # fewest new tokens (stops empty captions)
    num_beams: int = 1  # beam search when > 1
    do_sample: bool = False  # nucleus sampling instead of greedy/beam search
    top_p: float = 0.9  # with do_sample
    temperature: float = 1.0  # with do_sample
    repetition_penalty: float = 1.0  # > 1 discourages "a dog dog dog"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    load_in_8bit: bool = False  # bitsandbytes 8-bit weights (CUDA only): the 2.7b model in ~4 GB
    device: Literal["auto", "cpu", "cuda"] = "auto"  # wd14: auto is the CPU; cuda needs onnxruntime-gpu
    seed: int = 0  # same seed, images and batch size: same captions
    # wd14 only (kohya's tag_images_by_wd14_tagger.py options): a tag is written when the tagger's
    # confidence is at least its threshold (kohya's --general_threshold / --character_threshold)
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    # the most likely rating tag (general, sensitive, questionable, explicit) first (kohya's --use_rating_tags)
    rating_tag: bool = False
    # "long_hair" is written "long hair"; short kaomoji such as ^_^ and >_< keep theirs (kohya's
    # --remove_underscore, off by default there)
    replace_underscores: bool = True
    # tags never written, as the tagger names them or with spaces, e.g. [solo, "simple background"]
    # (kohya's --undesired_tags)
    undesired_tags: list[str] = field(default_factory=list)


def caption_model(c: CaptionConfig) -> str:
    """The model `c` captions with: data.caption.model, or its method's default (BLIP-2's for none)."""
    return c.model or DEFAULT_CAPTION_MODELS.get(c.method, DEFAULT_CAPTION_MODELS["blip2"])


@dataclass
class DataConfig:
    path: str = ""  # folder of images with caption sidecars (caption_extension) or metadata.jsonl
    # Several folders instead of path, each with its own settings (kohya's [[datasets.subsets]]): a list
    # of mappings, each a `path` and any of repeats, caption_extension, caption_prefix, caption_suffix,
    # keep_tokens, keep_tokens_separator, shuffle_tags, caption_dropout, caption_tag_dropout, random_flip,
    # folder_repeats, alpha_mask, default_caption, resolution; a key left out takes the data.* value, the
    # other data.* keys are the same for all. [] (default): the images of path alone. Not with path: list it as a subset
    subsets: list[SubsetConfig] = field(default_factory=list)
    # the caption of cat.png is cat<caption_extension> beside it (unless metadata.jsonl has it); kohya's
    # default is .caption (kohya's --caption_extension); "caption" is read as ".caption"
    caption_extension: str = ".txt"
    # the caption of an image that has none (no caption file or metadata.jsonl entry, and no <N>_<name>
    # folder naming it), e.g. "sks dog" (kohya's class_tokens); "": such images train uncaptioned
    default_caption: str = ""
    # training side in pixels (multiple of 8); None: 512 SD1.x, 1024 SDXL. A list, e.g. [512, 768, 1024]:
    # every image is trained at every side, each (image, side) an item of its own (an epoch is len × as
    # long), cropped or bucketed to about side² pixels; the largest side is the run's size (samples, class
    # images, held-out images, ss_resolution)
    resolution: Optional[Union[int, list[int]]] = None
    center_crop: bool = True  # False: random crop
    random_flip: bool = False  # horizontal flip with p=0.5
    repeats: int = 1  # each image is seen this many times per epoch (times its folder's N, below)
    # kohya's layout: an image in a folder named <N>_<name> under path ("10_sks dog", at any depth, the
    # nearest such folder counts) is seen N times per epoch, and if it has no caption (no caption file, no
    # metadata.jsonl entry) it is captioned <name>; 0_<name> folders are left out. False: names mean nothing
    folder_repeats: bool = True
    caption_prefix: str = ""  # prepended to every caption, e.g. a trigger word "sks, "
    # appended to every caption after tag shuffling and tag dropout (which never move or drop it),
    # e.g. ", in the style of mystyle"; like caption_prefix, taken literally and never written to a file
    caption_suffix: str = ""
    caption_dropout: float = 0.0  # probability of training on the empty caption
    # every caption of epochs n, 2n, ... (counted from 1) is dropped (kohya's --caption_dropout_every_n_epochs); 0: off
    caption_dropout_every_n_epochs: int = 0
    # each comma-separated tag after the first keep_tokens is left out with this probability every
    # time the caption is used (kohya's --caption_tag_dropout_rate); text embeddings are then not cached
    caption_tag_dropout: float = 0.0
    num_workers: int = 0  # DataLoader workers
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # captioning of uncaptioned images
    # aspect-ratio buckets: images keep their aspect, cropped to the nearest of a set of sizes of
    # about resolution² pixels; every batch comes from one bucket
    buckets: bool = False
    bucket_step: int = 64  # bucket sides are multiples of this (64 for real SD UNets)
    # no bucket side shorter / longer than this (kohya's --min_bucket_reso / --max_bucket_reso):
    # multiples of bucket_step with the square bucket between them; null: only the 2:1 aspect limit
    min_bucket_side: Optional[int] = None
    max_bucket_side: Optional[int] = None
    # an image that its bucket would enlarge (one smaller than about resolution² pixels) gets a
    # bucket of its own size instead, sides rounded down to bucket_step (kohya's --bucket_no_upscale)
    bucket_no_upscale: bool = False
    shuffle_tags: bool = False  # shuffle the comma-separated tags of each caption every time it is used
    keep_tokens: int = 0  # with shuffle_tags: this many leading tags (e.g. the trigger word) stay in place
    # kohya's keep_tokens_separator, e.g. "|||": in a caption holding it (`sks dog ||| red, blue`) the
    # tags before it, and after a second one, stay in place and are never dropped (instead of the
    # first keep_tokens); the separator is taken out of the text. "": off
    keep_tokens_separator: str = ""
    # read `(word:1.3)`, `(word)`, `[word]` and BREAK in captions (prefix and suffix too) as infer.py reads a
    # prompt: the text embeddings are weighted with A1111's rule (kohya's --weighted_captions); false: the
    # brackets are literal text. Tags still split at every comma: keep commas out of brackets
    weighted_captions: bool = False
    # images with an alpha channel (RGBA PNG/WebP) weight the loss of each latent pixel by their alpha
    # (resized, cropped and flipped with the image, area-averaged to the latent grid; kohya's --alpha_mask);
    # images without one weigh 1 everywhere. The RGB trained on is unchanged (composited over white)
    alpha_mask: bool = False
    # a folder of loss masks, one per training image with its file stem (kohya's --masked_loss with a
    # conditioning_data_dir): white trains, black is ignored, grey weighs between (the first channel of
    # an RGB mask, as kohya reads it). Beside the image's own folder path under it, or directly in it;
    # the same size as its image; resized, cropped and flipped with it. Not with alpha_mask
    mask_dir: Optional[str] = None
    # Held-out images for a validation loss (scored as train.validate_every_n_steps says), never
    # trained on. validation_split: this fraction of the images under path (at least one when > 0),
    # drawn by validation_seed from their file names, so the same ones in every process and resume
    validation_split: float = 0.0
    validation_path: Optional[str] = None  # or a folder of held-out images with captions; not with validation_split
    validation_seed: Optional[int] = None  # draws the held-out images and their fixed noise; null: train.seed


def resolution_sides(value: Optional[Union[int, list[int]]]) -> list[int]:
    """The training sides a `data.resolution` value (or a subset's) lists: [] for null, [n] for n."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def main_side(value: Optional[Union[int, list[int]]]) -> Optional[int]:
    """The run's size for what is made at one size (samples, class images, held-out images,
    ss_resolution): the largest listed side, the one the adapter is aimed at; None for null."""
    return max(resolution_sides(value), default=None)


def describe_sides(value: Optional[Union[int, list[int]]]) -> str:
    """A resolution value as logs and cards show it: "512" or "512, 768, 1024"."""
    return ", ".join(str(s) for s in resolution_sides(value))
