"""How each engine spells cputune's settings on its programs, and the settings only some engines
take (ik_llama.cpp's MLA mode, fused MoE, run-time repack, attention batch, huge pages), chosen
from the model and the box with a reason each. One place, so serve, bench and tune write the
same words for the same setting, read from configs/engines.toml rather than branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cputune.engine.build import Engine
from cputune.core.errors import EngineError
from cputune.model.gguf_model import ModelProfile
from cputune.machine.memory import MemoryInfo

GIB = 1 << 30
HUGE_PAGE_BYTES = 2 << 20  # x86-64's default huge page (Hugepagesize), what MAP_HUGETLB maps
# -amb: attention's K*Q buffer in MiB before a batch is split (common/common.cpp @8337e4cd turns
# anything under 128 into 128); 512 is the value ik_llama.cpp's DeepSeek guides use.
ATTN_MAX_BATCH_MIB = 512
MLA_MODE = 3  # -mla 3: the latent cache, attention computed from it in prefill and decode alike


@dataclass(frozen=True, slots=True)
class Choice:
    """One setting cputune picked for an engine, and why (serve prints both)."""

    setting: str  # a key of the engine's [args.*] tables: mla, fused_moe, repack ...
    value: str  # "on", "off", "3" ...
    reason: str
    args: tuple[str, ...] = ()  # how the program is given it; () when it is the default


def style_of(program: str) -> str:
    """llama-bench has its own option parser; llama-server and llama-sweep-bench share common's."""
    return "bench" if program == "llama-bench" else "server"


def value_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def words(engine: Engine, program: str, setting: str, value: object) -> list[str] | None:
    """The argv words that give `program` this setting's value; [] when it is the program's
    default, None when the engine cannot be given it."""
    table = engine.args.get(style_of(program), {}).get(setting, {})
    text = value_text(value)
    if text in table:
        return list(table[text])
    if "*" in table:
        return [w.replace("{}", text) for w in table["*"]]
    return None


def offers(engine: Engine, program: str, setting: str, value: object) -> bool:
    return words(engine, program, setting, value) is not None


def spell(engine: Engine, program: str, settings: Mapping[str, object],
          takes: frozenset[str] | None = None) -> tuple[list[str], list[str]]:
    """The argv words for `settings` ({setting: value}; None values are skipped), and a note for
    each that could not be written: a value the engine has no spelling for, or an option this
    build's `program` does not list in its --help (`takes`; None trusts the table)."""
    out: list[str] = []
    missing: list[str] = []
    for setting, value in settings.items():
        if value is None:
            continue
        w = words(engine, program, setting, value)
        if w is None:
            missing.append(f"{setting} {value_text(value)} ({engine.title}'s {program} cannot be given it)")
        elif w and takes is not None and w[0] not in takes:
            missing.append(f"{setting} {value_text(value)} (this {program} has no {w[0]})")
        else:
            out += w
    return out, missing


def owned_names(engine: Engine, setting: str) -> set[str]:
    """Every option name that sets `setting` in any of the engine's programs (to see whether the
    user already gave it after `--`)."""
    names = {w[0] for table in engine.args.values() for w in table.get(setting, {}).values() if w}
    # The [flags] table lists each option's aliases (-rtr, --run-time-repack).
    for spellings in engine.flags.values():
        if names & set(spellings):
            names.update(spellings)
    return names


def repackable_share(engine: Engine, model: ModelProfile) -> tuple[float, tuple[str, ...]]:
    """The share of the matmul weights whose type the engine repacks at load, and those types."""
    total = sum(model.matmul_bytes_by_type.values())
    types = tuple(sorted(t for t in model.matmul_bytes_by_type if t in engine.repack_types))
    done = sum(model.matmul_bytes_by_type[t] for t in types)
    return (done / total if total else 0.0), types


def free_huge_page_bytes(memory: MemoryInfo | None) -> int:
    """Free bytes in the machine-wide pool of the default huge page size."""
    if memory is None:
        return 0
    return sum(p.page_bytes * (p.free_pages or 0) for p in memory.hugepages
               if p.node_id is None and p.page_bytes == HUGE_PAGE_BYTES)


def choose(engine: Engine, model: ModelProfile, memory: MemoryInfo | None = None,
           load_mode: str = "mmap", program: str = "llama-server") -> tuple[Choice, ...]:
    """The engine-only settings worth giving `program` for this model on this box, each with why.
    Only what the engine's tables can spell is chosen, so an engine without them gets none."""
    out: list[Choice] = []

    def pick(setting: str, value: object, reason: str) -> None:
        if offers(engine, program, setting, value):
            out.append(Choice(setting, value_text(value), reason,
                              tuple(words(engine, program, setting, value) or ())))

    if model.mla and offers(engine, program, "mla", MLA_MODE):
        pick("mla", MLA_MODE, "the model has MLA attention (DeepSeek): mode 3 caches only the 576-wide "
             "latent per token and computes attention from it, in prefill and decode alike")
        pick("flash_attn", True, "flash attention over the MLA latent, as ik_llama.cpp runs DeepSeek with -mla 3")
        pick("attn_max_batch", ATTN_MAX_BATCH_MIB, f"attention's K*Q buffer is split into batches of at "
             f"most {ATTN_MAX_BATCH_MIB} MiB, so a long prompt does not grow the compute buffer")
    if model.is_moe:
        pick("fused_moe", True, f"{model.n_expert} routed experts: their up and gate matmuls and the "
             "activation run as one fused op")
    share, types = repackable_share(engine, model)
    huge = free_huge_page_bytes(memory)
    if load_mode == "mmap" and huge >= model.file_bytes and offers(engine, program, "huge_pages", True):
        pick("huge_pages", True, f"{huge / GIB:.1f} GiB of 2 MiB huge pages are free: the weights are "
             "read into them (MAP_HUGETLB) instead of 4 KiB page-cache pages"
             + ("; run-time repacking is left out, as it turns mmap off, which huge pages need "
                "(repack the file once instead: llama-quantize --repack)" if share else ""))
    elif share and load_mode != "mlock":
        pick("repack", True, f"{share:.0%} of the matmul weights ({', '.join(types)}) have interleaved "
             "variants this engine repacks them into at load; "
             + ("the weights are then read into RAM, not mmap'd (repack the file once to keep "
                "mmap: llama-quantize --repack)" if engine.repack_turns_mmap_off else "kept beside the file's pages"))
    return tuple(out)


def chosen(choices: tuple[Choice, ...]) -> dict[str, str]:
    return {c.setting: c.value for c in choices}


def loads_into_ram(engine: Engine, settings: Mapping[str, object]) -> bool:
    """Whether these settings make the engine read the weights into RAM instead of mmap."""
    return engine.repack_turns_mmap_off and value_text(settings.get("repack")) == "on"


def check_model(engine: Engine, model: ModelProfile) -> None:
    """An EngineError before the start when the engine's loader would abort on the model:
    ik_llama.cpp takes a mainline-written MLA file only with DeepSeek's own head sizes
    (mla_kv_width in configs/engines.toml)."""
    if not (engine.mla_kv_width and model.mla and model.n_layer):
        return
    width = model.kv_k_elems_per_token // model.n_layer  # one latent KV head per layer
    if width != engine.mla_kv_width or model.n_head % engine.mla_head_multiple:
        raise EngineError(
            f"{engine.title} cannot load this MLA model: its KV cache is {width} wide with "
            f"{model.n_head} heads, and {engine.title}'s DeepSeek loader takes only "
            f"{engine.mla_kv_width} (512 latent + 64 rope) with heads a multiple of {engine.mla_head_multiple}",
            hint="use --engine llama.cpp, or a model converted with DeepSeek's own dimensions")


def bench_args(engine: Engine, model: ModelProfile) -> tuple[list[str], list[str], tuple[Choice, ...]]:
    """What `cputune bench` gives the engine's llama-bench and llama-sweep-bench for this model
    (the choices serve would make, in each program's spelling), and the choices themselves."""
    bench = choose(engine, model, program="llama-bench")
    sweep = choose(engine, model, program="llama-sweep-bench")
    return ([w for c in bench for w in c.args], [w for c in sweep for w in c.args], bench)
