"""What `--model` names, decided once for every command.

inspect, predict, select, plan, serve, bench, tune and calibrate all call `resolve`, so one
string means the same thing everywhere:

1. **A path** when it ends in `.gguf`, holds a `/`, or names something that exists. It must be a
   GGUF file (any shard of a split model names the whole model); a folder or a missing file is
   an error, never a fall-through to a search. A URL (`https://`, `http://`, `hf://owner/repo/
   file.gguf`) is a file too, its header read over HTTP (cputune.model.remote); serve, bench and tune
   run the model, so for them (`catalog=False`) it is refused: download it first.
2. **Else a name**: the GGUF files in the models folder that are quants of it (a catalog id or
   alias, matched by the longest catalog name in the file name, or else part of a file name).
3. **Else a catalog model**, at the quant the caller asks for.

`--quant` then picks among the files, or the catalog preset. The result says which of the three
it was, so a command can say where its numbers came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cputune.model import remote, synth
from cputune.model.catalog import CatalogModel, catalog_model, catalog_profile, load_catalog
from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import ModelProfile, read_model
from cputune.core.fsutil import cache_root, expand_home
from cputune.model.modelfiles import (ENV_VAR, ModelFile, matches_model, models_dir, normalize, scan,
                                      skipped_text)
from cputune.core.units import parse_size


def check_model_arg(model: str | None) -> None:
    """Refuse an empty --model ('' or blanks): as a path it would be "." (the working folder),
    and as a name it would match every file."""
    if model is not None and not model.strip():
        raise ModelError(f"the model argument is empty ({model!r})",
                         hint="pass a GGUF file's path, or a model name to find in the models folder "
                              "or the catalog")


def no_gguf_files(folder: Path | None, problems: tuple[str, ...] | list[str] = ()) -> str:
    """'no GGUF files', and what was skipped when the folder held files it could not use."""
    skipped = skipped_text(folder, problems) if folder is not None else ""
    return "no GGUF files" + (f" ({skipped})" if skipped else "")


def looks_like_path(model: str) -> bool:
    """Rule 1: `x.gguf`, `dir/x`, a URL and anything that exists are files, not names."""
    return (remote.is_url(model) or model.endswith(".gguf") or os.sep in model
            or expand_home(model, "the model").exists())


def _keys(m: CatalogModel) -> list[str]:
    return [normalize(k) for k in (m.id, m.name, *m.aliases)]


def catalog_match(f: ModelFile, catalog: dict[str, CatalogModel]) -> str | None:
    """The catalog id a file is a quant of: the model whose id, name or alias is the longest one
    in the file name or header name, with the same architecture. "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M"
    holds both "deepseekr1" and "deepseekr1distillqwen7b"; the longer names the distill."""
    text = normalize(f.path.name) + "|" + normalize(f.profile.name or "")
    best, best_len = None, 0
    for m in catalog.values():
        length = max((len(k) for k in _keys(m) if k and k in text), default=0)
        if length > best_len:
            best, best_len = m, length
    return best.id if best is not None and best.arch == f.profile.arch else None


def model_file(path: Path | str) -> ModelFile:
    """The GGUF file at `path` (any shard of a split model names it all): a ModelError when the
    path is missing or is not a regular file, a GGUFError when its header is bad. A URL's header
    is read over HTTP (NetworkError when the server fails); the ModelFile's path is the URL."""
    if isinstance(path, str) and remote.is_url(path):
        prof = remote.read_model(path).profile
        return ModelFile(remote.Url(path), prof.n_shards, prof.file_type or "unknown", prof)
    path = expand_home(str(path), "the model")
    if not path.exists():
        raise ModelError(f"no GGUF file {path}",
                         hint="check the path, or pass a model name to look for in the models folder")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a GGUF file",
                         hint="pass one .gguf file, or the folder as --models-dir")
    prof = read_model(path)
    return ModelFile(Path(prof.path or path), prof.n_shards, prof.file_type or "unknown", prof)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What `--model [--quant]` named: `files` (one for a path, the matches in the models folder
    for a name) or a catalog model (`catalog_id`, no files)."""

    query: str | None
    source: str  # "file", "folder" or "catalog"
    files: tuple[ModelFile, ...]
    catalog_id: str | None = None
    folder: Path | None = None
    notes: tuple[str, ...] = ()
    folder_files: tuple[ModelFile, ...] = ()  # everything the folder holds, for error messages
    problems: tuple[str, ...] = ()  # the folder's .gguf files scan could not read, for error messages

    @property
    def catalog(self) -> CatalogModel | None:
        return catalog_model(self.catalog_id) if self.catalog_id else None

    def one_file(self, quant: str | None = None) -> ModelFile:
        """The single file this names (of `quant`, when given); a ModelError listing the
        choices when there are none or several."""
        pool = [f for f in self.files if not quant or normalize(f.quant) == normalize(quant)]
        if len(pool) == 1:
            return pool[0]
        q = quant.upper() if quant else "GGUF"
        of = f" of '{self.query}'" if self.query else ""
        if self.source == "catalog":
            raise ModelError(f"no {q} model{of} in {self.folder}: {self.catalog_id} is only a "
                             "catalog model here",
                             hint=f"download a GGUF of it into {self.folder}, or pass the file itself")
        have = ", ".join(f"{f.label} [{f.quant}]" for f in self.folder_files or self.files)
        if not pool:
            raise ModelError(f"no {q} model{of} in {self.folder}",
                             hint=f"it holds: {have or no_gguf_files(self.folder, self.problems)}")
        raise ModelError(f"{len(pool)} {q} models{of} in {self.folder}: "
                         + ", ".join(f.label for f in pool),
                         hint="pass --model NAME (part of the file name)"
                              + ("" if quant else " or --quant") + " to pick one")

    def profile(self, quant: str | None = None) -> ModelProfile:
        """The one model to predict: the file (of `quant`), else the catalog model at `quant`."""
        if self.source != "catalog":
            return self.one_file(quant).profile
        if not quant:
            raise ModelError(f"--quant is needed with the catalog model {self.catalog_id}",
                             hint="for example --quant q4_k_m (any llama-quantize preset)")
        return catalog_profile(self.catalog_id, quant, as_typed=self.query)


def resolve(model: str | None, quant: str | None = None, models_dir_option: Path | str | None = None,
            *, search_folder: bool = True, catalog: bool = True, remote_ok: bool | None = None) -> ResolvedModel:
    """Apply the three rules of this module's docstring. `search_folder=False` skips rule 2 (plan,
    for a box not built yet); `catalog=False` skips rule 3 (serve and bench need a file).
    `remote_ok`: whether a URL may name the model (its header read over HTTP); by default as
    `catalog`, since the callers that need a file run it (serve, bench, tune) and inspect, which
    reads only the header, says True. With no `model`, every file in the models folder (of
    `quant`) is a match."""
    check_model_arg(model)
    if model is not None and remote.is_url(model) and not (catalog if remote_ok is None else remote_ok):
        raise ModelError(f"{model} is a URL, and this command runs the model, which needs it on disk",
                         hint=f"{remote.DOWNLOAD_HINT}; inspect, predict and select read a URL's "
                              "header without downloading")
    if model is not None and looks_like_path(model):
        f = model_file(model)
        if quant and f.quant != "unknown" and normalize(f.quant) != normalize(quant):
            raise ModelError(f"{f.path.name} is {f.quant}, not {quant.upper()}",
                             hint="drop --quant when --model is a file, or name the file of that quant")
        return ResolvedModel(model, "file", (f,))
    cat_table = load_catalog()
    cat = None
    if model is not None:
        try:
            cat = catalog_model(model)
        except ModelError:
            cat = None
    folder = models_dir(models_dir_option)
    files: list[ModelFile] = []
    notes: list[str] = []
    problems: list[str] = []
    if search_folder:
        if folder.is_dir() or models_dir_option:
            files, problems = scan(folder)  # an explicit --models-dir that does not exist is an error
            notes += [f"skipped {p}" for p in problems]
        else:
            notes.append(f"no models folder at {folder} (set --models-dir or {ENV_VAR})")
    if model is None:
        mine = files
    elif cat is not None:
        mine = [f for f in files if catalog_match(f, cat_table) == cat.id]
    else:
        mine = [f for f in files if matches_model(f, model)]
    if quant:
        mine = [f for f in mine if normalize(f.quant) == normalize(quant)]
    if mine or not catalog or model is None:
        return ResolvedModel(model, "folder", tuple(mine), cat.id if cat else None, folder,
                             tuple(notes), tuple(files), tuple(problems))
    if cat is not None:
        if search_folder and folder.is_dir():
            what = f"{quant.upper()} GGUF" if quant else "GGUF"
            notes.append(f"no {what} of {cat.name} in {folder}: using the catalog "
                         "(sizes from the architecture and llama-quantize's type rules)")
        return ResolvedModel(model, "catalog", (), cat.id, folder, tuple(notes), tuple(files), tuple(problems))
    have = ", ".join(f"{f.path.name} [{f.quant}]" for f in files) or no_gguf_files(folder, problems)
    raise ModelError(f"no model {model!r} in the catalog or in {folder}",
                     hint="catalog models: " + ", ".join(cat_table) + f"; {folder} holds: {have}"
                          "; or pass the path of a GGUF file")


def bench_target(model: str | None, quant: str | None, folder: Path | str | None,
                 twin_size: str | None, llama_quantize: Path) -> Path:
    """The file `bench` measures: --model FILE; --model NAME --quant Q from the models folder;
    or, with --twin SIZE, a synthetic model of that architecture and quant, cached by shape."""
    check_model_arg(model)
    if twin_size:
        r = resolve(model, quant, folder) if model else None
        if r is not None and r.source != "catalog":
            f = r.one_file(quant)
            arch, quant = f.profile.arch, quant or f.quant
        else:
            arch = r.catalog.arch if r is not None else "llama"
        if not quant:
            raise ConfigError("--twin needs --quant (or a --model file to copy it from)")
        arch = "deepseek2" if arch == "deepseek2" else "llama"
        size = parse_size(twin_size)
        out = cache_root() / "twins" / f"{arch}-{size}-{normalize(quant)}-v{synth.SHAPES_VERSION}.gguf"
        if not out.exists():
            synth.make_quantized(out, arch, size, quant.upper(), llama_quantize)
        return out
    if not model and not quant:
        raise ConfigError("nothing to bench", hint="pass --model FILE, --quant Q (a file in the "
                          "models folder), or --twin SIZE --quant Q for a synthetic model")
    return resolve(model, quant, folder, catalog=False).one_file(quant).path
