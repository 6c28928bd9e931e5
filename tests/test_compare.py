"""`infer --compare`: adapter files side by side. Each cell equals a plain `infer` image of that
file (with the other --lora adapters) pixel for pixel; the base loads once and each file once; a run
folder expands in training order (by the steps each file records, else epochs, steps,
final); each file's weights are read once; bad input stops in one line before any image is drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris_helpers import write_lycoris
from PIL import Image
from safetensors.torch import save_file

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.inference import adapters as adapters_mod
from lora_trainer.inference import generate as generate_mod
from lora_trainer.inference.adapters import AdapterSpec, parse_adapter_spec
from lora_trainer.inference.compare import column_label, compare_grid, expand_compare, file_labels
from lora_trainer.inference.generate import Generator, Request

FAST = ["--steps", "3", "--seed", "5", "--width", "64", "--height", "64", "--device", "cpu"]
PROMPTS = ["a red circle", "a blue square"]
REQ = Request(prompt="", steps=3, seed=5, width=64, height=64)


@pytest.fixture(scope="module")
def third(tiny_sd15, tmp_path_factory):
    """A third random kohya adapter (UNet + text encoder), unlike random_adapters' a and b."""
    from lora_trainer.testing.inference_models import make_random_adapter

    return make_random_adapter(tiny_sd15, tmp_path_factory.mktemp("third") / "c.safetensors", rank=4, alpha=4.0,
                               seed=3)


@pytest.fixture(scope="module")
def gen(tiny_sd15, random_adapters):
    """The base with 'b' (diffusers layout) loaded as the adapter kept in every cell."""
    return Generator(tiny_sd15, [f"{random_adapters['b']}:0.8"], device="cpu")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _infer(tiny_sd15, out, *args) -> list:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    assert main(["infer", "--model", str(tiny_sd15), *prompts, *FAST, "--out", str(out), *args]) == 0
    return sorted(out.glob("*.png"))


def test_each_cell_is_the_plain_infer_image_of_its_file(tiny_sd15, random_adapters, third, tmp_path, monkeypatch):
    a, b = random_adapters["a"], random_adapters["b"]
    bases, loads = [], []
    real_base, real_load = generate_mod.load_base, adapters_mod.AdapterStack.load
    monkeypatch.setattr(generate_mod, "load_base", lambda *x, **k: bases.append(x[0]) or real_base(*x, **k))
    monkeypatch.setattr(adapters_mod.AdapterStack, "load",
                        lambda self, spec, name=None: loads.append(spec.path.name) or real_load(self, spec, name))
    _infer(tiny_sd15, tmp_path / "cmp", "--lora", f"{b}:0.8", "--compare", str(a), f"{third}:0.7")
    assert len(bases) == 1 and loads == ["b.safetensors", "a.safetensors", "c.safetensors"]

    grid = tmp_path / "cmp" / "compare-000.png"
    cells = sorted((tmp_path / "cmp" / "compare-000").glob("*.png"))
    assert [c.name for c in cells] == ["00-00-a.png", "00-01-c.png", "01-00-a.png", "01-01-c.png"]
    assert not list((tmp_path / "cmp").glob("**/.*.tmp"))
    text = Image.open(grid).text["parameters"]
    assert text.startswith("a red circle <lora:b:0.8>\n")
    assert f'Compare: "{a}, {third}:0.7"' in text
    monkeypatch.undo()
    with_a = _infer(tiny_sd15, tmp_path / "a", "--lora", f"{b}:0.8", "--lora", str(a))
    with_c = _infer(tiny_sd15, tmp_path / "c", "--lora", f"{b}:0.8", "--lora", f"{third}:0.7")
    for cell, plain in zip(cells, [with_a[0], with_c[0], with_a[1], with_c[1]]):
        assert np.array_equal(_pixels(cell), _pixels(plain)), cell.name
        assert Image.open(cell).text["parameters"] == Image.open(plain).text["parameters"]
    assert not np.array_equal(_pixels(cells[0]), _pixels(cells[1]))  # only the file differs, and it shows
    assert all(Image.open(c).text["parameters"].split(", Seed: ")[1].startswith("5,") for c in cells)
    # the grid holds the cells: 2 rows × 2 columns below/right of the labels, 2 px apart
    g = _pixels(grid)
    assert g.shape[0] > 2 * 66 and g.shape[1] > 2 * 66
    assert np.array_equal(g[-66:-2, -66:-2], _pixels(cells[3]))


def test_the_kept_adapter_is_in_every_cell_and_the_stack_is_as_before(gen, random_adapters, third):
    specs = [AdapterSpec(random_adapters["a"]), AdapterSpec(third, 0.7)]
    before = np.asarray(gen.generate(Request(prompt=PROMPTS[0], steps=3, seed=5, width=64, height=64))[0].image)
    with_b = compare_grid(gen, specs, PROMPTS, REQ)
    gen.set_enabled("b", False)
    try:
        without_b = compare_grid(gen, specs, PROMPTS, REQ)
    finally:
        gen.set_enabled("b", True)
    for row_with, row_without in zip(with_b.cells, without_b.cells):
        for c1, c2 in zip(row_with, row_without):
            assert not np.array_equal(np.asarray(c1.image), np.asarray(c2.image))
            assert [n for n, _, _ in c1.info.adapters][0] == "b"
    assert list(gen.adapters.specs) == ["b"] and gen.adapters.specs["b"].weight == 0.8
    layers = [m for part in (gen.pipe.unet, gen.pipe.text_encoder) for m in part.modules() if hasattr(m, "lora_A")]
    assert layers and all(set(m.lora_A) <= {"b"} for m in layers)  # the compared files' layers are freed
    after = np.asarray(gen.generate(Request(prompt=PROMPTS[0], steps=3, seed=5, width=64, height=64))[0].image)
    assert np.array_equal(before, after)  # every compared file is gone again
    boxes = with_b.grid.boxes
    assert np.array_equal(np.asarray(with_b.grid.image.crop(boxes[1][0])), np.asarray(with_b.cells[1][0].image))


def test_one_file_under_two_block_weight_presets_is_two_columns_told_apart(gen, random_adapters):
    a = random_adapters["a"]
    specs = [parse_adapter_spec(f"{a}:1:lbw=INS"), parse_adapter_spec(f"{a}:1:lbw=OUTS")]
    out = compare_grid(gen, specs, PROMPTS[:1], REQ)
    assert file_labels(specs) == ["a lbw=INS", "a lbw=OUTS"]
    assert file_labels([AdapterSpec(a, 0.5, lbw="OUTALL"), AdapterSpec(a)]) == ["a: 0.5 lbw=OUTALL", "a: 1"]
    assert out.info.extra["Compare"] == f"{a}:1:lbw=INS, {a}:1:lbw=OUTS"  # what --compare takes back
    assert [parse_adapter_spec(d).lbw for d in out.info.extra["Compare"].split(", ")] == ["INS", "OUTS"]
    first, second = (np.asarray(cell.image) for cell in out.cells[0])
    assert not np.array_equal(first, second)


def test_compare_with_sweep_is_files_by_weights(gen, tiny_sd15, random_adapters, third):
    specs = [AdapterSpec(random_adapters["a"]), AdapterSpec(third)]
    out = compare_grid(gen, specs, ["a red circle"], REQ, weights=[0.0, 0.5])
    assert len(out.cells) == 2 and len(out.cells[0]) == 2  # rows = files, columns = weights
    assert out.info.extra["Sweep"] == "0,0.5"
    alone = Generator(tiny_sd15, [f"{random_adapters['b']}:0.8", f"{third}:0.5"], device="cpu")
    expect = np.asarray(alone.generate(Request(prompt="a red circle", steps=3, seed=5, width=64, height=64))[0].image)
    assert np.array_equal(np.asarray(out.cells[1][1].image), expect)
    zero_a, zero_c = (np.asarray(row[0].image) for row in out.cells)
    assert np.array_equal(zero_a, zero_c)  # weight 0: both rows are the base with b only
    assert not np.array_equal(np.asarray(out.cells[0][1].image), expect)


def test_a_lycoris_file_compares_and_leaves_the_base_as_it_was(gen, tiny_sd15, random_adapters, tmp_path):
    t = "down_blocks.1.attentions.0.transformer_blocks.0"
    loha = tmp_path / "loha.safetensors"
    write_lycoris(gen.pipe, "sd15", loha, [("unet", f"{t}.attn1.to_q", "loha"), ("unet", f"{t}.ff.net.2", "lokr")],
                  seed=4)
    base = {k: v.clone() for k, v in gen.pipe.unet.state_dict().items()}
    out = compare_grid(gen, [AdapterSpec(loha, 0.9), AdapterSpec(random_adapters["a"])], PROMPTS[:1], REQ)
    assert all(torch.equal(v, base[k]) for k, v in gen.pipe.unet.state_dict().items())
    assert not gen.adapters._patches.originals  # the kept copies are freed
    alone = Generator(tiny_sd15, [f"{random_adapters['b']}:0.8", f"{loha}:0.9"], device="cpu")
    expect = alone.generate(Request(prompt=PROMPTS[0], steps=3, seed=5, width=64, height=64))[0].image
    assert np.array_equal(np.asarray(out.cells[0][0].image), np.asarray(expect))


def test_a_run_folder_expands_to_epochs_then_steps_then_final(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ["me-000002.safetensors", "me-000010.safetensors", "me-000001.safetensors", "me.safetensors",
             "me-step00000300.safetensors", "me-step00000050.safetensors", "me-000002.diffusers.safetensors",
             "me.diffusers.safetensors", "me-step00000300.diffusers.safetensors", "other.safetensors"]
    for name in names:
        (run / name).write_bytes(b"")
    (run / "config.yaml").write_text("output:\n  name: me\n")
    order = ["me-000001", "me-000002", "me-000010", "me-step00000050", "me-step00000300", "me"]
    specs = expand_compare([f"{run}:0.5"])
    assert [s.path.name for s in specs] == [f"{n}.safetensors" for n in order]
    assert {s.weight for s in specs} == {0.5}
    assert [column_label(s.path) for s in specs] == ["epoch 1", "epoch 2", "epoch 10", "step 50", "step 300", "me"]
    assert column_label(run / "me-000002.diffusers.safetensors") == "epoch 2"
    assert [s.path.name for s in expand_compare([str(run / "me-0*")])] == [f"{n}.safetensors" for n in order[:3]]
    (run / "config.yaml").unlink()  # the one numbered name is the run's
    assert [s.path.stem for s in expand_compare([str(run)])] == order
    (run / "you-000001.safetensors").write_bytes(b"")
    mixed = [AdapterSpec(run / "me-000001.safetensors", 0.5), AdapterSpec(run / "you-000001.safetensors"),
             AdapterSpec(run / "me.safetensors")]
    assert file_labels(mixed) == ["me epoch 1: 0.5", "you epoch 1: 1", "me: 1"]
    assert file_labels(specs[:2]) == ["epoch 1: 0.5", "epoch 2: 0.5"]
    with pytest.raises(ConfigError, match="adapters of several runs \\(me, you\\)"):
        expand_compare([str(run)])


def _numbered(path, steps: int | None):
    from safetensors.torch import save_file

    save_file({f"lora_unet_{_ATTN}.alpha": torch.tensor(1.0)}, str(path),
              metadata=None if steps is None else {"ss_steps": str(steps)})


def test_epoch_and_step_files_interleave_by_the_step_their_header_records(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = {"me-000001": 20, "me-000002": 40, "me-step00000030": 30, "me-step00000010": 10, "me": 45,
             "me-step00000040": 40}
    for name, steps in saved.items():
        _numbered(run / f"{name}.safetensors", steps)
    order = ["me-step00000010", "me-000001", "me-step00000030", "me-000002", "me-step00000040", "me"]
    assert [s.path.stem for s in expand_compare([str(run)])] == order
    assert [s.path.stem for s in expand_compare([str(run / "me-*")])] == order[:-1]
    _numbered(run / "me-000001.safetensors", None)  # one file that does not say: the names decide, for all
    assert [s.path.stem for s in expand_compare([str(run)])] == [
        "me-000001", "me-000002", "me-step00000010", "me-step00000030", "me-step00000040", "me"]


def test_compared_files_are_read_once_and_checked_from_their_headers(gen, random_adapters, third, tmp_path,
                                                                     monkeypatch):
    from lora_trainer.export import adapter as adapter_io, lycoris as lycoris_io

    t = "down_blocks.1.attentions.0.transformer_blocks.0"
    loha = tmp_path / "loha.safetensors"
    write_lycoris(gen.pipe, "sd15", loha, [("unet", f"{t}.attn1.to_q", "loha")], seed=4)
    reads = []
    for module in (adapter_io, lycoris_io):
        real = module.load_adapter
        monkeypatch.setattr(module, "load_adapter", lambda path, header_only=False, real=real: (
            reads.append((Path(path).name, header_only)) or real(path, header_only=header_only)))
    compare_grid(gen, [AdapterSpec(random_adapters["a"]), AdapterSpec(loha), AdapterSpec(third)], PROMPTS[:1], REQ)
    files = ["a.safetensors", "loha.safetensors", "c.safetensors"]
    assert [name for name, header in reads if header] == files  # the check before anything is drawn
    assert [name for name, header in reads if not header] == files  # the weights, once, to load each


@pytest.mark.parametrize("what, needle", [
    ("glob", "--compare: no file matches"), ("missing", "nothing.safetensors: file not found"),
    ("empty", "holds no adapter files"), ("merge", "leave out --merge"), ("batch", "leave out --batch-size"),
    ("sweep-prompts", "give one --prompt, not 2"), ("sweep-weight", "leave out :WEIGHT"),
    ("pickle", "old.ckpt is a pickle (.ckpt)"), ("sweep-embedding", "an embedding file has none"),
])
def test_bad_compare_input_is_one_line_before_loading(tmp_path, capsys, random_adapters, what, needle):
    a = str(random_adapters["a"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "old.ckpt").write_bytes(b"not read")
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "tok.safetensors"))  # an embedding, no weight
    compare = {"pickle": [str(tmp_path / "*.ckpt")], "glob": [str(tmp_path / "run-*.safetensors")], "missing": [str(tmp_path / "nothing.safetensors")],
               "empty": [str(tmp_path / "empty")], "sweep-weight": [f"{a}:0.5"],
               "sweep-embedding": [a, str(tmp_path / "tok.safetensors")]}.get(what, [a])
    extra = {"merge": ["--merge"], "batch": ["--batch-size", "2"], "sweep-prompts": ["--sweep", "0,1", "--prompt", "y"],
             "sweep-weight": ["--sweep", "0,1"], "sweep-embedding": ["--sweep", "0,1"]}.get(what, [])
    rc = main(["infer", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--compare", *compare, *extra,
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


_ATTN = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _bad_file(kind: str, tiny_sdxl, tmp_path):
    """(file, what the error says) for a file that cannot load into the tiny SD 1.5 base."""
    from safetensors.torch import save_file

    from lora_trainer.testing.inference_models import make_random_adapter

    path = tmp_path / f"{kind}.safetensors"
    if kind == "sdxl":
        make_random_adapter(tiny_sdxl, path, variant="sdxl", text_encoder=False)
        return path, "an SDXL adapter does not fit an SD 1.x base"
    if kind == "sd2-sized":  # 1024-wide layers on the 32-wide tiny base
        save_file({f"lora_unet_{_ATTN}.lora_down.weight": torch.zeros(4, 1024),
                   f"lora_unet_{_ATTN}.lora_up.weight": torch.zeros(1024, 4)}, str(path))
        return path, "transformer_blocks.0.attn1.to_q is 1024->1024 but this base's is 32->32"
    save_file({f"lora_unet_{_ATTN}.hada_w1_a": torch.zeros(32, 4), f"lora_unet_{_ATTN}.hada_w1_b": torch.zeros(4, 32)},
              str(path))
    return path, "is a LoHa module without hada_w2_a; the file is incomplete"


@pytest.mark.parametrize("kind", ["sdxl", "sd2-sized", "incomplete-loha"])
def test_a_file_that_does_not_fit_stops_before_any_image(tiny_sd15, tiny_sdxl, random_adapters, tmp_path, capsys,
                                                         monkeypatch, kind):
    bad, why = _bad_file(kind, tiny_sdxl, tmp_path)
    drawn = []
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, *x, **k: drawn.append(1) or real(self, *x, **k))
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", *FAST, "--compare", str(random_adapters["a"]),
               str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"--compare: {bad}: " in err and why in err, err
    assert not drawn and not (tmp_path / "out").exists()
