"""One resolver for --model: the three rules, and every command taking its answer from it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from cputune.model import modelfiles, resolve as resolver
from cputune.core.errors import GGUFError, ModelError
from cputune.model.resolve import looks_like_path, resolve

PACKAGE = Path(resolver.__file__).parent.parent  # cputune/


@pytest.fixture
def folder(tmp_path, tiny_models):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_models["llama"].quantized["q8_0"], d / "DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf")
    shutil.copy(tiny_models["llama"].quantized["q4_k_m"], d / "DeepSeek-R1-Distill-Llama-8B-Q4_K_M.gguf")
    shutil.copy(tiny_models["deepseek2"].quantized["q8_0"], d / "tiny-ds2-Q8_0.gguf")
    return d


@pytest.mark.parametrize("text,is_path", [("x.gguf", True), ("dir/x", True), ("deepseek-r1", False),
                                          ("q4_k_m", False)])
def test_what_counts_as_a_path(text, is_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(text) is is_path


def test_an_existing_name_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deepseek-r1").mkdir()  # a folder named like a model is never read as a file
    assert looks_like_path("deepseek-r1")
    with pytest.raises(ModelError, match="is a folder, not a GGUF file"):
        resolve("deepseek-r1", "q4_k_m")


def test_a_mistyped_file_is_an_error_not_a_search(folder):
    with pytest.raises(ModelError, match="no GGUF file"):
        resolve(str(folder / "DeepSeek-R1-Distill-Llama-8B-Q4_K_L.gguf"), None, folder)


def test_a_file_and_its_quant(folder):
    path = folder / "tiny-ds2-Q8_0.gguf"
    r = resolve(str(path), "q8_0")
    assert r.source == "file" and r.one_file().path == path
    with pytest.raises(ModelError, match="is Q8_0, not Q4_K_M"):
        resolve(str(path), "q4_k_m")


def test_a_corrupt_file_is_a_gguf_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFError):
        resolve(str(bad))


def test_a_catalog_name_finds_its_files_first(folder):
    r = resolve("r1-distill-llama-8b", None, folder)
    assert r.source == "folder" and r.catalog_id == "r1-distill-llama-8b"
    assert sorted(f.quant for f in r.files) == ["Q4_K_M", "Q8_0"]
    assert r.profile("q4_k_m").path.endswith("Q4_K_M.gguf")  # the real file, not the catalog


def test_a_catalog_quant_not_on_disk_falls_back_to_the_catalog(folder):
    r = resolve("r1-distill-llama-8b", "q2_k", folder)
    assert r.source == "catalog" and r.profile("q2_k").path is None
    assert any("using the catalog" in n for n in r.notes)
    with pytest.raises(ModelError, match="only a catalog model here"):
        resolve("r1-distill-llama-8b", "q2_k", folder).one_file()
    with pytest.raises(ModelError, match="--quant is needed"):
        resolve("deepseek-r1", None, folder).profile()


def test_files_only_for_serve_and_bench(folder):
    with pytest.raises(ModelError, match="no Q2_K model of 'r1-distill-llama-8b'"):
        resolve("r1-distill-llama-8b", "q2_k", folder, catalog=False).one_file("q2_k")
    assert resolve(None, "q8_0", folder, catalog=False).files[0].quant == "Q8_0"
    with pytest.raises(ModelError, match="2 Q8_0 models in"):
        resolve(None, "q8_0", folder, catalog=False).one_file("q8_0")


def test_an_unknown_name_lists_what_there_is(folder):
    with pytest.raises(ModelError, match="no model 'llama-9000'") as e:
        resolve("llama-9000", None, folder)
    assert "deepseek-r1" in e.value.hint and "tiny-ds2-Q8_0.gguf [Q8_0]" in e.value.hint


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_model_argument_is_named_not_read_as_the_working_folder(empty, folder, tmp_path, monkeypatch):
    from cputune.engine import serve

    monkeypatch.chdir(folder)  # "" as a path would be "." -- this folder of models
    for call in (lambda: resolve(empty), lambda: resolve(empty, "q8_0", folder, catalog=False),
                 lambda: resolve(empty, None, search_folder=False),
                 lambda: resolver.bench_target(empty, "q8_0", folder, None, tmp_path / "llama-quantize"),
                 lambda: serve.resolve_model(serve.ServeRequest(quant=None, model=empty))):
        with pytest.raises(ModelError, match=r"the model argument is empty") as e:
            call()
        assert "is a folder" not in e.value.message and "GGUF file" in e.value.hint


def test_a_folder_with_no_usable_gguf_says_what_it_skipped(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    with pytest.raises(ModelError) as e:
        resolve(None, "q8_0", d, catalog=False).one_file("q8_0")
    assert e.value.hint == "it holds: no GGUF files"  # nothing there: nothing to name
    (d / "broken.gguf").symlink_to(tmp_path / "nowhere")
    (d / "model-Q8_0.gguf.part").write_bytes(b"GGUF")
    (d / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    (d / "README.md").write_text("x")
    (d / "sub").mkdir()
    (d / "sub" / "a.safetensors").write_text("x")
    (d / "sub" / "b.bin").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ModelError) as e:
        resolve(None, "q8_0", d, catalog=False).one_file("q8_0")
    hint = e.value.hint
    assert hint.startswith("it holds: no GGUF files (skipped 6: bad.gguf") and hint.endswith(" and 3 more)")
    assert "broken.gguf" in hint and "README.md (not a .gguf file)" in hint, hint
    with pytest.raises(ModelError) as e:
        resolve("llama-9000", None, d)
    assert f"{d} holds: no GGUF files (skipped 6: " in e.value.hint
    assert modelfiles.skipped_text(d / "sub") == ("skipped 2: a.safetensors (not a .gguf file); "
                                                  "b.bin (a symbolic link to nothing)")
    monkeypatch.setattr(modelfiles, "SKIPPED_SHOWN", 10)
    assert "model-Q8_0.gguf.part (an unfinished download)" in modelfiles.skipped_text(d)
    monkeypatch.setattr(modelfiles, "SKIPPED_WALK", 3)  # a huge folder is not walked to its end
    assert modelfiles.skipped_text(d / "sub") == ("skipped 2: a.safetensors (not a .gguf file); "
                                                  "b.bin (a symbolic link to nothing)")
    assert modelfiles.skipped_text(d, ["x.gguf is truncated"]) == ("skipped at least 2: x.gguf is truncated; "
                                                                   "README.md (not a .gguf file) and more")


def test_plan_does_not_search_the_folder(folder):
    r = resolve("r1-distill-llama-8b", None, folder, search_folder=False)
    assert r.source == "catalog"


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_every_command_resolves_through_the_one_resolver():
    """No module but resolve.py decides whether --model is a path: the old is_file/exists/suffix
    tests (four versions that disagreed) must not come back in the command modules."""
    for name in ("cli.py", "predict/candidates.py", "engine/serve.py", "engine/tune.py", "predict/calibrate.py",
                 "engine/bench.py"):
        src = (PACKAGE / name).read_text()
        assert "Path(model).expanduser()" not in src, name
        assert "Path(req.model).expanduser()" not in src, name
    assert "resolve" in _calls(PACKAGE / "cli.py") | _calls(PACKAGE / "predict/candidates.py")
    assert "resolve" in _calls(PACKAGE / "engine/serve.py")
