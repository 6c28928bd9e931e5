"""Dataset stage: folder scanning, captions, image reading and the training Dataset."""

from lora_trainer.data.captions import (
    METADATA_FILE,
    find_captions,
    read_metadata_jsonl,
    read_sidecar_caption,
    resolve_captions,
)
from lora_trainer.data.dataset import (
    Example,
    ImageCaptionDataset,
    dataset_summary,
    resize_shorter_side,
    scan_dataset,
    to_tensor,
)
from lora_trainer.data.images import IMAGE_EXTENSIONS, is_image_file, load_image, to_rgb
from lora_trainer.data.tags import tag_frequency, training_caption

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "Example",
    "ImageCaptionDataset",
    "dataset_summary",
    "find_captions",
    "is_image_file",
    "load_image",
    "read_metadata_jsonl",
    "read_sidecar_caption",
    "resize_shorter_side",
    "resolve_captions",
    "scan_dataset",
    "tag_frequency",
    "to_rgb",
    "to_tensor",
    "training_caption",
]
