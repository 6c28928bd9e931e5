"""Hub ids that cannot load fail at once in one line (no minutes of download retries)."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import constants

from lora_trainer.errors import ModelError
from lora_trainer.hubcheck import check_hub_model


def _cache_with(root, repo_id: str, filename: str):
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_text("{}")


def test_offline_and_not_cached_names_the_key_and_the_cure(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"^model\.base: 'someone/model' is not in the local Hugging Face cache and "
                                         r"HF_HUB_OFFLINE is set"):
        check_hub_model("someone/model", "model.base")


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.perf_counter()
    with pytest.raises(ModelError) as err:
        check_hub_model("Salesforce/blip2-opt-2.7b", "data.caption.model", "config.json")
    assert time.perf_counter() - started < 15
    message = str(err.value)
    assert message.startswith("data.caption.model: 'Salesforce/blip2-opt-2.7b' is not in the local Hugging Face "
                              "cache and the hub cannot be reached") and "\n" not in message


def test_a_cached_model_passes_without_the_network(monkeypatch, tmp_path):
    _cache_with(tmp_path, "someone/model", "model_index.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_hub_model("someone/model", "model.base")
