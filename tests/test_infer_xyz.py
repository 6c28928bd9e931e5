"""`infer --grid-x/--grid-y` (A1111's X/Y/Z plot): every cell is the image a plain `infer` with that
cell's settings draws, pixel for pixel, and carries those settings in its PNG; the base and adapters
load once and weights change in place; a weight axis draws --sweep's cells; prompt-sr replaces as
A1111's Prompt S/R; bad axes stop in one line before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
from infer_helpers import one_line_error
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.inference import adapters as adapters_mod
from lora_trainer.inference import generate as generate_mod
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.sweep import sweep_grid
from lora_trainer.inference.xyz import xyz_grid
from lora_trainer.inference.xyz_axes import cell_prompts, parse_axis
from lora_trainer.pnginfo import parse_a1111_parameters

FAST = ["--steps", "2", "--seed", "5", "--width", "32", "--height", "32", "--device", "cpu"]
REQ = Request(prompt="", steps=2, seed=5, width=32, height=32)
CELL = 32 + 2  # a cell and the gap after it (imagegrid.labelled_grid)


@pytest.fixture(scope="module")
def gen(tiny_sd15, random_adapters):
    return Generator(tiny_sd15, [f"{random_adapters['a']}:0.8", str(random_adapters["b"])], device="cpu")


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if not isinstance(image, Image.Image) else image)


def _infer(tiny_sd15, out, *args) -> list:
    assert main(["infer", "--model", str(tiny_sd15), *FAST, "--out", str(out), *args]) == 0
    return sorted(out.glob("*.png"))


def _parameters(path) -> str:
    return Image.open(path).text["parameters"]


def test_each_cell_is_the_plain_infer_image_of_its_settings(tiny_sd15, random_adapters, tmp_path, monkeypatch):
    a = random_adapters["a"]
    bases, loads = [], []
    real_base, real_load = generate_mod.load_base, adapters_mod.AdapterStack.load
    monkeypatch.setattr(generate_mod, "load_base", lambda *x, **k: bases.append(x[0]) or real_base(*x, **k))
    monkeypatch.setattr(adapters_mod.AdapterStack, "load",
                        lambda self, spec, name=None: loads.append(spec.path.name) or real_load(self, spec, name))
    out = tmp_path / "grid"
    _infer(tiny_sd15, out, "--prompt", "a red circle", "--lora", f"{a}:0.8",
           "--grid-x", "cfg=3,9", "--grid-y", "sampler=euler,DDIM")
    assert len(bases) == 1 and loads == ["a.safetensors"]  # loaded once, not per cell
    monkeypatch.undo()

    cells = sorted((out / "xyz-000").glob("*.png"))
    assert [c.name for c in cells] == ["00-00.png", "00-01.png", "01-00.png", "01-01.png"]
    assert not list(out.glob("**/.*.tmp"))
    settings = [("euler", 3), ("euler", 9), ("ddim", 3), ("ddim", 9)]  # rows = samplers, columns = CFG
    for cell, (sampler, cfg) in zip(cells, settings):
        [plain] = _infer(tiny_sd15, tmp_path / f"{sampler}-{cfg}", "--prompt", "a red circle", "--lora", f"{a}:0.8",
                         "--scheduler", sampler, "--cfg", str(cfg))
        assert np.array_equal(_pixels(cell), _pixels(plain)), cell.name
        assert _parameters(cell) == _parameters(plain)
        info = parse_a1111_parameters(_parameters(cell))
        assert (info.cfg_scale, info.sampler, info.seed, info.adapters[0][:2]) == (
            cfg, {"euler": "Euler", "ddim": "DDIM"}[sampler], 5, ("a", 0.8))
    assert not np.array_equal(_pixels(cells[0]), _pixels(cells[1]))

    grid = Image.open(out / "xyz-000.png")
    # 160 px of row labels, then 2 columns; 3 lines of "CFG / scale: / 3" (42 px) over 2 rows
    assert grid.size == (160 + 2 * CELL, 42 + 2 * CELL)
    assert np.array_equal(_pixels(grid)[-CELL:-2, -CELL:-2], _pixels(cells[3]))
    assert grid.text["parameters"] == (_parameters(cells[0]) + ', Script: X/Y/Z plot, X Type: CFG Scale, '
                                       'X Values: "3,9", Y Type: Sampler, Y Values: "euler,DDIM"')


def test_a_weight_axis_draws_the_sweeps_cells_and_gives_the_weight_back(gen):
    x = parse_axis("weight:a=0,0.5,1")
    plot = xyz_grid(gen, "a red circle", REQ, x=x)
    sweep = sweep_grid(gen, ["a red circle"], [0, 0.5, 1], "a", REQ)
    assert len(plot.cells) == 1 and len(plot.cells[0]) == 3
    for cell, box in zip(plot.cells[0], sweep.grid.boxes[0]):
        assert np.array_equal(_pixels(cell.image), _pixels(sweep.grid.image.crop(box)))
    assert [c.info.adapters[0][:2] for c in plot.cells[0]] == [("a", 0.0), ("a", 0.5), ("a", 1.0)]
    assert gen.adapters.specs["a"].weight == 0.8
    # one axis: a strip, the prompt as its row label; 160 + 3 columns wide
    assert plot.grid.image.size == (160 + 3 * CELL, 30 + CELL)  # labels "a:" over "0.5": 2 lines, 30 px
    assert plot.info.extra["X Type"] == "weight:a" and plot.info.extra["X Values"] == "0,0.5,1"


def test_an_lbw_axis_draws_as_lora_lbw_and_gives_the_blocks_back(gen, tiny_sd15, random_adapters):
    before = gen.generate(REQ)[0].image
    plot = xyz_grid(gen, "", REQ, y=parse_axis("lbw:a=OUTALL,INS", "--grid-y"))
    assert gen.adapters.specs["a"].lbw is None
    assert np.array_equal(_pixels(gen.generate(REQ)[0].image), _pixels(before))
    alone = Generator(tiny_sd15, [f"{random_adapters['a']}:0.8:lbw=INS", str(random_adapters["b"])], device="cpu")
    assert np.array_equal(_pixels(plot.cells[1][0].image), _pixels(alone.generate(REQ)[0].image))
    assert [c[0].info.block_weights for c in plot.cells] == [{"a": "OUTALL"}, {"a": "INS"}]
    assert not np.array_equal(_pixels(plot.cells[0][0].image), _pixels(plot.cells[1][0].image))


def test_prompt_sr_replaces_in_the_prompt_and_the_negative_prompt(gen):
    req = Request(prompt="", negative_prompt="red blur", steps=2, seed=5, width=32, height=32)
    plot = xyz_grid(gen, "a red circle, red", req, x=parse_axis('prompt-sr=red,blue,"green, big"'))
    infos = [(c.info.prompt, c.info.negative_prompt) for c in plot.cells[0]]
    assert infos == [("a red circle, red", "red blur"), ("a blue circle, blue", "blue blur"),
                     ("a green, big circle, green, big", "green, big blur")]  # every place, the first as it is
    plain = gen.generate(Request(prompt="a blue circle, blue", negative_prompt="blue blur", steps=2, seed=5,
                                 width=32, height=32))[0].image
    assert np.array_equal(_pixels(plot.cells[0][1].image), _pixels(plain))
    assert plot.info.extra["X Type"] == "Prompt S/R"
    # a second text along the other axis, as A1111's Prompt S/R on X and Y (epochs × weights of <lora:...>)
    plot = xyz_grid(gen, "a red circle", REQ, x=parse_axis("prompt-sr=red,blue"),
                    y=parse_axis("prompt-sr=circle,square", "--grid-y"))
    assert [[c.info.prompt for c in row] for row in plot.cells] == [["a red circle", "a blue circle"],
                                                                    ["a red square", "a blue square"]]


def test_quoted_values_may_hold_commas():
    numbers = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
    axis = parse_axis(f'lbw:a=OUTALL, "{numbers}"')
    assert axis.values == ["OUTALL", numbers] and axis.labels() == ["a lbw=OUTALL", f"a lbw={numbers}"]
    axis = parse_axis('prompt-sr=red, "green, big"')
    assert axis.values == ["red", "green, big"] and axis.labels() == ["red", "green, big"]
    assert parse_axis("sampler=Euler A,dpm++_2m").labels() == ["Euler a", "DPM++ 2M"]
    assert parse_axis("cfg=3, 7.5").values == [3.0, 7.5]


def test_the_prompts_an_embedding_is_looked_for_in_are_every_cells():
    axes = [parse_axis("prompt-sr=red,EasyNegative"), parse_axis("prompt-sr=circle,square", "--grid-y")]
    texts = cell_prompts(["a red circle"], "red blur", axes)
    assert {"a EasyNegative circle", "EasyNegative blur", "a EasyNegative square", "a red square"} <= set(texts)


def test_seed_steps_clip_skip_and_hires_cells_carry_their_settings(tiny_sd15, tmp_path):
    out = tmp_path / "grids"
    _infer(tiny_sd15, out, "--prompt", "a red circle", "--prompt", "a blue square",
           "--grid-x", "seed=1,2", "--grid-y", "steps=1,2")
    for k, prompt in enumerate(["a red circle", "a blue square"]):  # one grid per prompt
        cells = sorted((out / f"xyz-00{k}").glob("*.png"))
        read = [parse_a1111_parameters(_parameters(c)) for c in cells]
        assert [(i.prompt, i.seed, i.steps) for i in read] == [(prompt, 1, 1), (prompt, 2, 1), (prompt, 1, 2),
                                                               (prompt, 2, 2)]
    out = tmp_path / "hires"
    _infer(tiny_sd15, out, "--prompt", "a red circle", "--hires-scale", "1.5",
           "--grid-x", "hires-strength=0.3,0.6", "--grid-y", "clip-skip=1,2")
    cells = sorted((out / "xyz-000").glob("*.png"))
    read = [parse_a1111_parameters(_parameters(c)) for c in cells]
    assert [(i.denoising_strength, i.clip_skip) for i in read] == [(0.3, 1), (0.6, 1), (0.3, 2), (0.6, 2)]
    assert Image.open(cells[0]).size == (48, 48)
    [plain] = _infer(tiny_sd15, tmp_path / "plain", "--prompt", "a red circle", "--hires-scale", "1.5",
                     "--hires-strength", "0.6", "--clip-skip", "2")
    assert np.array_equal(_pixels(cells[3]), _pixels(plain))
    assert _parameters(cells[3]) == _parameters(plain)


def test_a_clip_skip_past_the_layers_stops_before_the_first_cell(gen, monkeypatch):
    drawn = []
    monkeypatch.setattr(gen, "generate", lambda req: drawn.append(req))
    with pytest.raises(ConfigError, match="--grid-x: clip-skip: got 99; expected 1 to"):
        xyz_grid(gen, "x", REQ, x=parse_axis("clip-skip=1,99"))
    assert drawn == []


TOO_MANY = ["--grid-x", "seed=" + ",".join(map(str, range(11))), "--grid-y", "steps=" + ",".join("1" * 10)]


@pytest.mark.parametrize("flags, message", [
    (["--grid-x", "denoise=0.5"], "--grid-x: 'denoise=0.5' is no axis; write AXIS=V1,V2,... with AXIS one of cfg"),
    (["--grid-y", "cfg"], "--grid-y: 'cfg' has no '='"),
    (["--grid-x", "cfg="], "--grid-x: cfg: give at least one value"),
    (["--grid-x", "cfg=3,abc"], "--grid-x: cfg: 'abc' is not a number; give numbers above 0"),
    (["--grid-x", "cfg=0,3"], "--grid-x: cfg: 0 is not allowed; give numbers above 0"),
    (["--grid-x", "steps=2.5"], "--grid-x: steps: '2.5' is not an integer"),
    (["--grid-x", "steps=0"], "--grid-x: steps: 0 is not allowed; give integers from 1 to 1000"),
    (["--grid-x", "steps=20,1001"], "--grid-x: steps: 1001 is not allowed; give integers from 1 to 1000"),
    (["--grid-x", "clip-skip=0"], "--grid-x: clip-skip: 0 is not allowed"),
    (["--grid-x", "sampler=euler,eulr"], "--grid-x: sampler: 'eulr' is not a known sampler; did you mean euler?"),
    (["--grid-x", "weight=0,1"], "--grid-x: 'weight': name the --lora, e.g. weight:style="),
    (["--grid-x", "cfg:a=3"], "--grid-x: 'cfg:a': cfg takes no ':NAME'"),
    (["--grid-x", "weight:zzz=0,1", "--lora", "{a}"], "--grid-x: weight:zzz: 'zzz' is none of the --lora files"),
    (["--grid-x", "lbw:a=OUTALL,FOO", "--lora", "{a}"], "--grid-x: lbw:a: lbw=FOO is no preset"),
    (["--grid-x", "lbw:a=1,0,1", "--lora", "{a}"], "--grid-x: lbw:a: '1,0,1': each value is a preset or a whole list"),
    (["--grid-x", 'lbw:a="1,0,1"', "--lora", "{a}"],
     "--grid-x: lbw:a: {a}: lbw= has 3 values; an SD 1.x adapter takes 17"),
    (["--grid-x", "cfg=3,5", "--grid-y", "cfg=7"], "--grid-x and --grid-y both change cfg"),
    (["--grid-x", "prompt-sr=x,y", "--grid-y", "prompt-sr=x,z"], "--grid-x and --grid-y both change prompt-sr"),
    (["--grid-x", "weight:a=0", "--grid-y", "weight:a.safetensors=1", "--lora", "{a}"], "both change weight:a"),
    (["--grid-x", "cfg=3", "--sweep", "0,1", "--lora", "{a}"], "leave out --sweep"),
    (["--grid-x", "cfg=3", "--compare", "{a}"], "leave out --compare"),
    (["--grid-y", "cfg=3", "--merge", "--num-images", "2"], "leave out --merge, --num-images"),
    (TOO_MANY, "110 cells (1 prompt(s) × 11 × 10 values) are more than 100"),
    (["--grid-x", "prompt-sr=dog,cat"], "--grid-x: prompt-sr: 'dog' is in neither --prompt 'x' nor --negative-prompt"),
    (["--grid-x", "hires-strength=0.5"], "--grid-x: hires-strength needs --hires-scale"),
    (["--grid-x", "hires-strength=0.5,1.5", "--hires-scale", "2"], "hires-strength: 1.5 is not allowed"),
    (["--grid-max-cells", "5"], "--grid-max-cells needs --grid-x or --grid-y"),
])
def test_bad_axes_are_one_line_errors_before_any_model_loads(flags, message, random_adapters, tmp_path, capsys,
                                                             monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(generate_mod, "load_base", no_loading)
    flags = [f.replace("{a}", str(random_adapters["a"])) for f in flags]
    message = message.replace("{a}", str(random_adapters["a"]))
    code = main(["infer", "--model", str(tmp_path / "no-model"), "--prompt", "x", *FAST, "--out",
                 str(tmp_path / "out"), *flags])
    assert code != 0
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_grid_max_cells_allows_more(tmp_path, monkeypatch):
    def loading(*args, **kwargs):
        raise ConfigError("loading")  # the checks passed: the base would load now

    monkeypatch.setattr(generate_mod, "load_base", loading)
    with pytest.raises(ConfigError, match="^loading$"):
        from lora_trainer.cli import build_parser
        from lora_trainer.inference.command import run_infer

        run_infer(build_parser().parse_args(["infer", "--model", "m", "--prompt", "x", *FAST, "--out",
                                             str(tmp_path / "out"), *TOO_MANY, "--grid-max-cells", "110"]))
