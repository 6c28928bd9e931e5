"""The `lora-trainer serve` command: bad flags refused in one line before the model loads; the real
command prints its URL, answers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from infer_helpers import one_line_error
from lora_trainer.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag", ["--lora-dir", "--embedding-dir"])
def test_a_missing_or_file_folder_is_refused_before_loading(tmp_path, capsys, flag):
    # the model does not exist either: the folder is named first, before anything loads
    assert main(["serve", "--model", str(tmp_path / "no-model"), flag, str(tmp_path / "nothere")]) == 2
    assert one_line_error(capsys) == f"error: {flag}: {tmp_path / 'nothere'}: not found; give a folder"
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--model", str(tmp_path / "no-model"), flag, str(tmp_path / "file")]) == 2
    assert "is a file" in one_line_error(capsys)


def test_a_missing_model_is_refused_in_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--lora-dir", str(tmp_path)]) == 2
    assert "--model" in one_line_error(capsys)


@pytest.mark.parametrize("value", ["0", "1001"])
def test_a_max_side_that_is_no_size_is_refused_before_loading(tmp_path, capsys, value):
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--max-side", value]) == 2
    message = f"error: --max-side: {value} is not allowed; give a positive multiple of 8, e.g. 4096"
    assert one_line_error(capsys) == message


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(tiny_sd15):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer.cli", "serve", "--model", str(tiny_sd15),
                                "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+", line)
        assert url, line + process.stderr.read() if process.poll() is not None else line
        with urllib.request.urlopen(url.group(0) + "/sdapi/v1/sd-models", timeout=30) as response:
            assert json.loads(response.read())[0]["title"] == "model"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out.strip() == "stopped" and "Traceback" not in err
