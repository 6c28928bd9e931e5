"""Pivotal tuning (config section `embedding`): a textual-inversion embedding trained with the LoRA.
The vectors start from the init words' table rows, move, freeze after embedding.train_fraction,
resume exactly, follow the EMA, reach the files (standalone and bundled) that infer.py reads back
into the same prompt embeddings training computed, on SD1.5 and SDXL, and under 2 processes."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import run_config
from rank_helpers import TWO_PROCESS_RUNS

from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.training.conditioning import encode_prompts
from lora_trainer.training.loop import train
from lora_trainer.training.pivotal import word_tables

TOKEN = "geoshape"  # the example config's caption prefix: every caption names it
PIVOTAL = [f"embedding.token={TOKEN}", "train.warmup=0", "embedding.vectors=2", "embedding.init_words=shape", "output.dtype=fp32",
           "sample.prompts=[]"]


def _rows(model, subfolder: str, tokenizer_folder: str, words: str, count: int) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model, subfolder=tokenizer_folder)
    table = CLIPTextModel.from_pretrained(model, subfolder=subfolder).get_input_embeddings().weight
    ids = tok(words, add_special_tokens=False).input_ids
    return table[[ids[i % len(ids)] for i in range(count)]].detach().float()


def _emb(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


@pytest.fixture(scope="module")
def sd15_run(tiny_sd15, example_data, tmp_path_factory):
    """Text encoder and UNet LoRA with the embedding, bundled, both layouts, a checkpoint each step."""
    out = tmp_path_factory.mktemp("pivotal") / "out"
    cfg = run_config(tiny_sd15, example_data, out, *PIVOTAL, "lora.train_text_encoder=true", "train.max_steps=4",
                     "embedding.bundle=true", "output.format=both", "output.save_every_n_steps=1",
                     "output.keep_checkpoints=0", "embedding.train_fraction=0.5")
    return cfg, train(cfg, show_progress=False)


def test_vectors_start_from_the_init_words_train_then_freeze(sd15_run, tiny_sd15):
    cfg, result = sd15_run
    start = _rows(tiny_sd15, "text_encoder", "tokenizer", "shape", 2)
    ckpt = cfg.output.dir + "/checkpoints/step-{0:06d}/embeddings/" + TOKEN + "-step{0:08d}.safetensors"
    final = _emb(f"{cfg.output.dir}/embeddings/{TOKEN}.safetensors")
    steps = [_emb(ckpt.format(s))["emb_params"] for s in (1, 2, 3)] + [final["emb_params"]]  # no checkpoint at 4
    assert not torch.allclose(steps[0], start) and not torch.equal(steps[1], steps[0])  # trained at steps 1, 2
    assert torch.equal(steps[2], steps[1]) and torch.equal(steps[3], steps[1])  # train_fraction 0.5 of 4 steps
    assert list(final) == ["emb_params"] and torch.equal(result.embedding["clip"], steps[3])
    kept = sorted(p.name for p in (result.output_dir / "embeddings").iterdir())
    assert kept == [f"{TOKEN}.safetensors"]  # checkpoint embeddings stay in their checkpoint folders


def test_bundled_vectors_are_in_the_kohya_file_only(sd15_run):
    cfg, result = sd15_run
    kohya, diffusers = (_emb(p) for p in result.adapter_paths)
    assert torch.equal(kohya[f"bundle_emb.{TOKEN}.string_to_param.*"], result.embedding["clip"])
    assert not [k for k in diffusers if "bundle_emb" in k]
    assert [k for k in kohya if k.startswith("bundle_emb")] == [f"bundle_emb.{TOKEN}.string_to_param.*"]


def _training_embeds(result, base_model, variant: str, text: str, vectors=None):
    """encode_prompts as training called it: the trained encoders, the run's word tables."""
    from transformers import CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")]
    if variant == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2"))
    base = SimpleNamespace(variant=variant, tokenizer=tokenizers[0], tokenizer_2=tokenizers[-1] if variant == "sdxl"
                           else None, text_encoders=[result.text_encoder, result.text_encoder_2][:len(tokenizers)])
    words = word_tables(base, TOKEN, vectors if vectors is not None else result.embedding)
    with torch.no_grad():
        return encode_prompts(base, base.text_encoders, [text], torch.device("cpu"), words=words)


@pytest.mark.parametrize("source", ["standalone", "bundled"])
def test_infer_reads_the_files_into_the_prompt_embeddings_training_used(sd15_run, tiny_sd15, source):
    cfg, result = sd15_run
    text = f"{TOKEN}, a red circle on a light blue background"
    want = _training_embeds(result, tiny_sd15, "sd15", text)[0]
    kohya, diffusers = (str(p) for p in result.adapter_paths)
    if source == "standalone":  # the diffusers layout, which has no place for the vectors, and the file beside it
        gen = Generator(tiny_sd15, [diffusers], device="cpu", dtype=torch.float32,
                        embeddings=[f"{cfg.output.dir}/embeddings/{TOKEN}.safetensors"])
    else:
        gen = Generator(tiny_sd15, [kohya], device="cpu", dtype=torch.float32)
    got, used = gen._embeds(gen.pipe, Request(prompt=text, negative_prompt=""))
    assert used == [TOKEN]
    torch.testing.assert_close(got["prompt_embeds"], want, rtol=0, atol=2e-5)
    start = _training_embeds(result, tiny_sd15, "sd15", text, {"clip": _rows(tiny_sd15, "text_encoder", "tokenizer",
                                                                             "shape", 2)})[0]
    assert (got["prompt_embeds"] - start).abs().max() > 1e-3  # the trained vectors, not the initial ones


def test_resume_across_the_freeze_is_exact(sd15_run, tiny_sd15, example_data, tmp_path):
    cfg, straight = sd15_run
    shutil.copytree(f"{cfg.output.dir}/checkpoints/step-000001", tmp_path / "b" / "checkpoints" / "step-000001")
    resumed = train(run_config(tiny_sd15, example_data, tmp_path / "b", *PIVOTAL, "lora.train_text_encoder=true",
                               "train.max_steps=4", "embedding.bundle=true", "output.format=both",
                               "embedding.train_fraction=0.5", "train.resume=latest"), show_progress=False)
    assert resumed.losses == straight.losses[1:]
    assert torch.equal(resumed.embedding["clip"], straight.embedding["clip"])
    # a checkpoint without the embedding is refused in one line, before training
    with pytest.raises(ConfigError, match="embedding.token as they were"):
        train(run_config(tiny_sd15, example_data, tmp_path / "b", "output.dtype=fp32", "sample.prompts=[]",
                         "lora.train_text_encoder=true", "train.max_steps=5", "train.resume=latest"),
              show_progress=False)
    # and so is one of another word: its vectors would have gone on training as this one
    other = [a for a in PIVOTAL if not a.startswith("embedding.token=")] + ["embedding.token=circle"]
    with pytest.raises(ConfigError, match=r"holds the vectors of embedding.token=geoshape, not circle; resume with "
                                          r"embedding.token=geoshape"):
        train(run_config(tiny_sd15, example_data, tmp_path / "b", *other, "lora.train_text_encoder=true",
                         "train.max_steps=5", "embedding.bundle=true", "output.format=both", "train.resume=latest"),
              show_progress=False)
    assert "token: geoshape" in (tmp_path / "b" / "config.yaml").read_text()  # refused before it was replaced


def test_a_checkpoint_from_before_the_token_was_kept_is_told_by_its_embedding_file(tmp_path):
    from lora_trainer.training.checkpoints import TrainerState, _saved_token

    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "my-tok-step00000010.safetensors").write_bytes(b"x")
    assert _saved_token(tmp_path, TrainerState(10, 3, 1)) == "my-tok"
    assert _saved_token(tmp_path, TrainerState(10, 3, 1, embedding_token="kept")) == "kept"
    assert _saved_token(tmp_path / "none", TrainerState(10, 3, 1)) == ""


def test_frozen_text_encoder_epoch_files_and_the_ema(tiny_sd15, example_data, tmp_path):
    """No text-encoder LoRA: the vectors still train (through the frozen encoder); the files hold the
    EMA of the vectors; epoch embedding files rotate with the adapter's."""
    cfg = run_config(tiny_sd15, example_data, tmp_path / "run", *PIVOTAL, "train.batch_size=4", "train.max_steps=6",
                     "output.save_every_n_epochs=1", "output.save_last_n_epochs=1", "train.ema_decay=0.5",
                     "embedding.lr=5e-3")
    result = train(cfg, show_progress=False)
    start = _rows(tiny_sd15, "text_encoder", "tokenizer", "shape", 2)
    assert (result.embedding["clip"] - start).abs().max() > 1e-3
    final = _emb(tmp_path / "run" / "embeddings" / f"{TOKEN}.safetensors")["emb_params"]
    torch.testing.assert_close(final, result.ema["embedding.vectors.clip"], rtol=0, atol=0)
    assert not torch.allclose(final, result.embedding["clip"])
    assert sorted(p.name for p in (tmp_path / "run" / "embeddings").iterdir()) == [
        f"{TOKEN}-000002.safetensors", f"{TOKEN}.safetensors"]
    assert not [k for k in _emb(result.adapter_paths[0]) if "lora_te" in k or "bundle" in k]


def test_sdxl_embedding_has_both_encoders_vectors_and_reads_back(tiny_sdxl, example_data, tmp_path):
    cfg = run_config(tiny_sdxl, example_data, tmp_path / "xl", *PIVOTAL, "train.max_steps=2", "embedding.bundle=true")
    result = train(cfg, show_progress=False)
    saved = _emb(tmp_path / "xl" / "embeddings" / f"{TOKEN}.safetensors")
    assert sorted(saved) == ["clip_g", "clip_l"] and saved["clip_l"].shape[0] == saved["clip_g"].shape[0] == 2
    for part, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        assert torch.equal(saved[part], result.embedding[part])
        start = _rows(tiny_sdxl, sub, "tokenizer" if part == "clip_l" else "tokenizer_2", "shape", 2)
        assert (saved[part] - start).abs().max() > 1e-4
    bundled = {k: v for k, v in _emb(result.adapter_paths[0]).items() if k.startswith("bundle_emb")}
    assert sorted(bundled) == [f"bundle_emb.{TOKEN}.clip_g", f"bundle_emb.{TOKEN}.clip_l"]
    gen = Generator(tiny_sdxl, [], device="cpu", dtype=torch.float32,  # a UNet-only LoRA: no part in the text
                    embeddings=[str(tmp_path / "xl" / "embeddings" / f"{TOKEN}.safetensors")])
    text = f"{TOKEN}, a red circle"
    got, _ = gen._embeds(gen.pipe, Request(prompt=text, negative_prompt=""))
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # the frozen encoders training read with
    result.text_encoder, result.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
    hidden, pooled = _training_embeds(result, tiny_sdxl, "sdxl", text)
    torch.testing.assert_close(got["prompt_embeds"], hidden, rtol=0, atol=2e-5)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=0, atol=2e-5)


def test_two_processes_train_the_one_process_vectors(two_process_runs, tiny_sd15, example_data, tmp_path):
    options, _ = TWO_PROCESS_RUNS["pivotal"]
    two = _emb(two_process_runs["pivotal"] / "embeddings" / f"{TOKEN}.safetensors")["emb_params"]
    one = train(run_config(tiny_sd15, example_data, tmp_path / "one", *options, "train.batch_size=2"),
                show_progress=False)
    torch.testing.assert_close(two, one.embedding["clip"], rtol=0, atol=1e-5)
    assert (two - _rows(tiny_sd15, "text_encoder", "tokenizer", "shape", 2)).abs().max() > 1e-3


def test_bad_embedding_settings_are_refused_in_one_line(tiny_sd15, example_data, tmp_path):
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            train(run_config(tiny_sd15, example_data, tmp_path / "bad", "sample.prompts=[]", *overrides),
                  show_progress=False)
        return str(info.value)

    assert "is in none of the 8 training captions" in error("embedding.token=ohwx")
    assert not (tmp_path / "bad" / "config.yaml").exists()  # refused before the run started
    assert not (tmp_path / "bad" / "captions.jsonl").exists()  # else the fixed command is refused the folder
    assert "is in none of the 8 training captions" in error("embedding.token=ohwx")  # the same answer again
    for overrides, needle in ((["embedding.token=my.style"], "holds '.'"),
                              (["embedding.token=ohwx", "embedding.vectors=76"], "expected 1 to 75"),
                              (["embedding.vectors=2"], "with no embedding.token"),
                              (["embedding.token=ohwx", "embedding.bundle=true", "output.format=diffusers"],
                               "has no place for an embedding")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", *overrides])
    with pytest.raises(ConfigError, match=r"did you mean embedding.vectors \(kohya/diffusers"):
        load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", "train.num_vectors_per_token=2"])


def test_embedding_alone_is_textual_inversion(tiny_sd15, example_data, tmp_path):
    """lora.train_unet=false with no text-encoder LoRA and embedding.token: only the vectors train;
    the result is the embedding file (no LoRA file, no sweep), which infer.py reads back into the
    prompt embeddings training used, and which finished.json names for train.resume=latest."""
    overrides = [*PIVOTAL, "lora.train_unet=false", "train.max_steps=4", "embedding.lr=1e-2",
                 "sample.prompts=[geoshape]", "sample.steps=2", "sample.grid_weights=[0,1]"]
    cfg = run_config(tiny_sd15, example_data, tmp_path / "ti", *overrides)
    result = train(cfg, show_progress=False)
    out = tmp_path / "ti"
    assert result.adapter_paths == [] and not list(out.glob("*.safetensors"))
    assert (out / "samples" / "step_00004" / "00.png").is_file() and not (out / "samples" / "sweep.png").exists()
    start = _rows(tiny_sd15, "text_encoder", "tokenizer", "shape", 2)
    saved = _emb(out / "embeddings" / f"{TOKEN}.safetensors")["emb_params"]
    assert torch.equal(saved, result.embedding["clip"]) and (saved - start).abs().max() > 1e-3
    from peft.tuners.lora import LoraLayer

    assert not [m for m in (*result.unet.modules(), *result.text_encoder.modules()) if isinstance(m, LoraLayer)]
    from diffusers import StableDiffusionPipeline

    result.text_encoder = StableDiffusionPipeline.from_pretrained(tiny_sd15).text_encoder  # frozen: the base's
    text = f"{TOKEN}, a red circle"
    gen = Generator(tiny_sd15, [], device="cpu", dtype=torch.float32,
                    embeddings=[str(out / "embeddings" / f"{TOKEN}.safetensors")])
    got, used = gen._embeds(gen.pipe, Request(prompt=text, negative_prompt=""))
    assert used == [TOKEN]
    torch.testing.assert_close(got["prompt_embeds"], _training_embeds(result, tiny_sd15, "sd15", text)[0],
                               rtol=0, atol=2e-5)
    again = train(run_config(tiny_sd15, example_data, out, *overrides, "train.resume=latest"), show_progress=False)
    assert f"already finished at step 4, embedding at {out / 'embeddings' / f'{TOKEN}.safetensors'};" in again.finished
    assert again.steps == 4
    for extra, needle in ((["embedding.bundle=true"], "no LoRA file to hold it"),
                          (["embedding.train_fraction=0.5"], "nothing would train after it")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", f"embedding.token={TOKEN}",
                               "lora.train_unet=false", *extra])
    with pytest.raises(ConfigError, match="nothing would train"):
        load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", "lora.train_unet=false"])


def test_vectors_continue_from_an_embedding_file_or_a_bundle(sd15_run, tiny_sd15, tiny_sdxl, example_data, tmp_path,
                                                             caplog):
    """embedding.init_from (an embedding file, or an adapter bundling the token) and lora.init_from's
    bundle set the vectors' start; a tiny lr keeps them there for one step, which shows the start."""
    cfg, result = sd15_run
    standalone = f"{cfg.output.dir}/embeddings/{TOKEN}.safetensors"
    kohya = str(result.adapter_paths[0])
    still = [f"embedding.token={TOKEN}", "embedding.vectors=2", "embedding.lr=1e-12", "train.max_steps=1",
             "output.dtype=fp32", "sample.prompts=[]", "train.warmup=0"]
    for i, overrides in enumerate(([f"embedding.init_from={standalone}", "lora.train_unet=false"],
                                   [f"embedding.init_from={kohya}"],
                                   [f"lora.init_from={kohya}", "lora.train_text_encoder=true"])):
        run = train(run_config(tiny_sd15, example_data, tmp_path / f"c{i}", *still, *overrides), show_progress=False)
        torch.testing.assert_close(run.embedding["clip"], result.embedding["clip"], rtol=0, atol=1e-9)

    def error(*overrides: str, base=tiny_sd15) -> str:
        with pytest.raises(ConfigError) as info:
            train(run_config(base, example_data, tmp_path / "bad", *still, *overrides), show_progress=False)
        return str(info.value)

    assert "has 2 vector(s); set embedding.vectors=2" in error(f"embedding.init_from={standalone}",
                                                                 "embedding.vectors=3")
    assert "is an SD 1.x embedding but model.base is SDXL" in error(f"embedding.init_from={standalone}", base=tiny_sdxl)
    other = shutil.copy(kohya, tmp_path / "other.safetensors")
    assert "bundles only 'geoshape', not 'ohwx'" in error(f"embedding.init_from={other}", "embedding.token=ohwx",
                                                           "data.caption_prefix=ohwx")
    assert "not found" in error(f"embedding.init_from={tmp_path / 'none.safetensors'}")
    assert not (tmp_path / "bad" / "config.yaml").exists()  # all before the run started
    with pytest.raises(ConfigError, match="set with embedding.init_from"):
        load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", f"embedding.token={TOKEN}",
                           f"embedding.init_from={standalone}", "embedding.init_words=shape"])
    caplog.clear()
    train(run_config(tiny_sd15, example_data, tmp_path / "plain", "output.dtype=fp32", "sample.prompts=[]",
                     "train.max_steps=1", f"lora.init_from={kohya}", "lora.train_text_encoder=true"),
          show_progress=False)
    assert "also bundles the embedding(s) 'geoshape', which this run neither trains" in caplog.text


@pytest.mark.parametrize("name, tiny", [("sdxl-pivotal", "tiny_sdxl"), ("sd15-textual-inversion", "tiny_sd15")])
def test_ready_embedding_configs_train(name, tiny, example_data, tmp_path, request):
    """configs/sdxl-pivotal.yaml (LoRA + embedding) and configs/sd15-textual-inversion.yaml (the
    embedding alone) as shipped, on a tiny base for two steps: the files each promises."""
    from conftest import REPO

    cfg = load_config(REPO / "configs" / f"{name}.yaml", [
        f"model.base={request.getfixturevalue(tiny)}", f"data.path={example_data}", f"output.dir={tmp_path}",
        "data.resolution=64", "train.max_steps=2", "train.warmup=0", "train.optimizer=adamw",
        "train.mixed_precision=no", "train.gradient_checkpointing=false", "sample.prompts=[]", "log.tensorboard=false",
        "output.save_every_n_steps=0", "output.save_step_adapters=false"])
    assert cfg.embedding.token == "ohwx" and (cfg.lora.train_unet == (name == "sdxl-pivotal"))
    result = train(cfg, show_progress=False)
    assert (tmp_path / "embeddings" / "ohwx.safetensors").is_file()
    assert [p.name for p in result.adapter_paths] == ([f"{cfg.output.name}.safetensors"] if cfg.lora.train_unet else [])


def test_inspect_reads_embedding_files(sd15_run, tmp_path, capsys):
    from lora_trainer.cli import main
    from lora_trainer.export.inspect import inspect_adapter

    cfg, result = sd15_run
    report = inspect_adapter(f"{cfg.output.dir}/embeddings/{TOKEN}.safetensors")
    assert (report["layout"], report["token"], report["trained_as"], report["vectors"]) == ("embedding", TOKEN, TOKEN, 2)
    want = [round(float(n), 4) for n in result.embedding["clip"].norm(dim=1)]
    assert report["parts"]["clip"]["norms"] == want and report["metadata"]["ss_steps"] == "4"
    step = f"{cfg.output.dir}/checkpoints/step-000001/embeddings/{TOKEN}-step00000001.safetensors"
    assert main(["inspect", step]) == 0
    out = capsys.readouterr().out
    assert f"token       {TOKEN}-step00000001 (from the file name" in out and f"FILE:{TOKEN} uses that word" in out
    diffusers = tmp_path / "learned_embeds.safetensors"  # diffusers' layout: {token: vectors}
    safetensors.torch.save_file({"<cat-toy>": torch.ones(3, 32)}, str(diffusers))
    report = inspect_adapter(diffusers)
    assert (report["token"], report["token_from"], report["vectors"]) == ("<cat-toy>", "the key", 3)
    assert report["parts"]["clip"]["norms"] == [round(32 ** 0.5, 4)] * 3
    assert inspect_adapter(result.adapter_paths[0])["layout"] == "kohya"  # a LoRA is still a LoRA


def test_init_words_longer_than_the_vectors_are_warned_about(tiny_sd15, caplog):
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_trainer.training.pivotal import start_words

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    base = SimpleNamespace(variant="sd15", tokenizer=tokenizer, tokenizer_2=None,
                           text_encoders=[CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")])

    def start(words, vectors):
        cfg = load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", f"embedding.token={TOKEN}",
                                 f"embedding.init_words={words}", f"embedding.vectors={vectors}"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="lora_trainer.training.pivotal"):
            start_words(cfg, base)
        return [r.getMessage() for r in caplog.records]

    ids = tokenizer("red haired woman", add_special_tokens=False).input_ids  # the tiny vocabulary splits words
    assert start("red haired woman", 2) == [
        f"embedding.init_words: 'red haired woman' is {len(ids)} tokens but embedding.vectors is 2, so the vectors "
        f"start from the first 2 only ({tokenizer.decode(ids[:2])!r}); raise embedding.vectors to {len(ids)} or give "
        "fewer words"]
    assert start("red haired woman", len(ids)) == [] and start("red", 75) == []  # fewer: repeated, as the README says


def test_a_class_prompt_naming_the_trigger_word_is_warned_about(caplog):
    from lora_trainer.training.pivotal import check_token_in_run

    def warned(class_prompt):
        cfg = load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", f"embedding.token={TOKEN}",
                                 "dreambooth.instance_prompt=a photo of geoshape art", "dreambooth.num_class_images=4",
                                 "dreambooth.class_data=cls",
                                 f"dreambooth.class_prompt={class_prompt}"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="lora_trainer.training.pivotal"):
            check_token_in_run(cfg, [SimpleNamespace(caption="a photo of geoshape art")])
        return [r.getMessage() for r in caplog.records]

    assert warned("a photo of Geoshape art") == [
        "dreambooth.class_prompt 'a photo of Geoshape art' names embedding.token 'geoshape': the class images are "
        "drawn without its vectors, and the prior loss then pulls them towards the class in general; leave the "
        "trigger word out of the class prompt"]
    assert warned("a photo of art") == [] and warned("geoshapes on paper") == []
