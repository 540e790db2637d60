"""Model folder resolution and quant lookup on real generated GGUF files."""

from __future__ import annotations

import shutil

import pytest

from cputune.model import modelfiles
from cputune.core.errors import ConfigError, ModelError
from cputune.model.resolve import resolve


@pytest.fixture
def folder(tmp_path, tiny_models, tiny_split):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_models["llama"].quantized["q8_0"], d / "tiny-llama-Q8_0.gguf")
    shutil.copy(tiny_models["llama"].quantized["q4_k_m"], d / "tiny-llama-Q4_K_M.gguf")
    shutil.copy(tiny_models["deepseek2"].quantized["q8_0"], d / "tiny-ds2-Q8_0.gguf")
    for p in tiny_split:
        shutil.copy(p, d / p.name)
    (d / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    return d


def test_scan_counts_split_files_once_and_reports_unreadable(folder):
    files, problems = modelfiles.scan(folder)
    names = [f.path.name for f in files]
    assert len([n for n in names if "-of-" in n]) == 1
    split = next(f for f in files if "-of-" in f.path.name)
    assert split.n_shards > 1 and "+" in split.label
    assert problems and problems[0].startswith("broken.gguf")


def find(folder, quant, model=None):
    """What serve and bench take for --quant Q [--model NAME]: the resolver, files only."""
    return resolve(model, quant, folder, catalog=False).one_file(quant)


def test_find_by_quant_and_model(folder):
    f = find(folder, "q4-k-m")
    assert f.path.name == "tiny-llama-Q4_K_M.gguf" and f.quant == "Q4_K_M"
    assert find(folder, "Q8_0", model="ds2").path.name == "tiny-ds2-Q8_0.gguf"


def test_find_ambiguous_and_missing_name_what_is_there(folder):
    with pytest.raises(ModelError, match="Q8_0 models of 'tiny' in") as e:
        find(folder, "q8_0", model="tiny")
    assert "--model" in e.value.hint
    with pytest.raises(ModelError, match="no Q2_K model") as e:
        find(folder, "Q2_K")
    assert "tiny-llama-Q8_0.gguf [Q8_0]" in e.value.hint


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv(modelfiles.ENV_VAR, raising=False)
    assert modelfiles.models_dir() == modelfiles.default_dir()
    cfg = tmp_path / "cfg" / "cputune" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('models_dir = "/srv/models"\n')
    assert str(modelfiles.models_dir()) == "/srv/models"
    monkeypatch.setenv(modelfiles.ENV_VAR, "/data/gguf")
    assert str(modelfiles.models_dir()) == "/data/gguf"
    assert str(modelfiles.models_dir("/opt/m")) == "/opt/m"
    cfg.write_text("models_dir = [")
    monkeypatch.delenv(modelfiles.ENV_VAR)
    with pytest.raises(ConfigError, match="not valid TOML"):
        modelfiles.models_dir()


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        modelfiles.scan(tmp_path / "nope")
    assert modelfiles.ENV_VAR in e.value.hint
