"""OFT, BOFT, GLoRA and norm files made by the LyCORIS package itself (its `create_network`, saved
with its `save_weights`) load into `infer` with the outputs of the package's own forward. Runs only
where `lycoris-lora` is installed (the `dev` extra, so CI, installs it); `test_lycoris_ortho.py` checks the same
types against the published formulas everywhere."""

from __future__ import annotations

import logging

import pytest
import torch
from test_lycoris import _close, _outputs

from lora_trainer.inference.generate import Generator

lycoris_kohya = pytest.importorskip("lycoris.kohya")

# LyCORIS' "full" preset names time_embedding twice on diffusers UNets (4.1.3): pick the targets
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


@pytest.mark.parametrize("algo, dim, options", [
    ("diag-oft", 8, {"constraint": "1e-4", "rescaled": "true"}), ("boft", 4, {}),
    ("glora", 4, {}), ("lora", 4, {"train_norm": "true"}),
])
def test_files_written_by_lycoris_give_its_own_outputs(tiny_sd15, tmp_path, algo, dim, options):
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    (tmp_path / "preset.toml").write_text(PRESET)
    ref = Generator(tiny_sd15, device="cpu")
    base = _outputs(ref.pipe)
    net = lycoris_kohya.create_network(1.0, dim, 1.0, None, ref.pipe.text_encoder, ref.pipe.unet, algo=algo,
                                       preset=str(tmp_path / "preset.toml"), **options)
    net.apply_to(ref.pipe.text_encoder, ref.pipe.unet, True, True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "oft" in name else 0.1) + name.endswith("rescale"))
    want = _outputs(ref.pipe)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})

    got = _outputs(Generator(tiny_sd15, [str(path)], device="cpu").pipe)
    assert all((want[k] - base[k]).abs().max() > 1e-2 for k in want)
    _close(got, want, atol=1e-5)
