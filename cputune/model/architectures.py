"""Model architectures as data (configs/architectures/ARCH.toml), written down once.

One table per llama.cpp architecture (general.architecture) says which hyperparameters a model of
it has, which GGUF keys llama.cpp reads them from, and which tensors it loads, with their shapes
as expressions of the hyperparameters and their role (attention, routed or shared expert, router,
embedding, output, norm ...). Three users read it:

- the catalog (catalog.py) lays out a published model's tensors without the file,
- synth (synth.py) writes a tiny random model that the real llama.cpp loads,
- inspect (gguf_model.py's profile) names the role of each tensor of a real file.

Shapes and conditions are small arithmetic expressions ("n_head * head_dim", "i >= n_dense_lead"),
parsed once by a closed evaluator: names, numbers, strings, + - * / // % **, comparisons, and/or/
not, `a if c else b`, and the functions min, max, round_to. Nothing else runs.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cputune.core.data import config_path, tomllib
from cputune.core.errors import ConfigError

ARCH_DIR = "architectures"

# Roles a tensor plays; what the per-token arithmetic and the writers need to know of it.
ROLES = {
    "embedding": "token embedding (one row read per token)",
    "output": "the logits matrix",
    "norm": "a norm's scale (F32, ones in a synthetic model)",
    "bias": "a bias (F32, zeros in a synthetic model)",
    "attention": "attention projections and their small tensors",
    "indexer": "sparse-attention indexer (DeepSeek V3.2 lightning indexer)",
    "ffn": "a dense feed-forward block",
    "router": "the expert router (F32)",
    "expert": "routed experts (read at used / total per token)",
    "shared_expert": "shared experts (read whole per token)",
    "rope": "rope frequency factors",
    "recurrent": "linear-attention / recurrent state projections",
}
FILLS = ("random", "ones", "zeros")

# --------------------------------------------------------------------------------------------
# expressions


def round_to(x: float, step: int, minimum: int | None = None) -> int:
    """x rounded to a multiple of step (at least `minimum`, default one step)."""
    return max(step if minimum is None else minimum, int(round(x / step)) * step)


_FUNCTIONS = {"min": min, "max": max, "round_to": round_to}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


class Expr:
    """One parsed expression; `names` are the variables it reads."""

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise ConfigError(f"{where}: cannot parse {text!r}: {e.msg}") from None
        self.names = set()
        self._check(self.tree)

    def _check(self, node) -> None:
        ok = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Name, ast.Constant,
              ast.Tuple, ast.Call, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, *_BINOPS, *_CMPOPS)
        if not isinstance(node, ok):
            raise ConfigError(f"{self.where}: {type(node).__name__} is not allowed in {self.text!r}",
                              hint="use names, numbers, arithmetic, comparisons, `a if c else b`, "
                                   "min, max and round_to")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
                raise ConfigError(f"{self.where}: only {', '.join(_FUNCTIONS)} may be called in {self.text!r}")
            for a in node.args:
                self._check(a)
            return
        if isinstance(node, ast.Name):
            self.names.add(node.id)
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            raise ConfigError(f"{self.where}: constant {node.value!r} is not a number or string")
        for child in ast.iter_child_nodes(node):
            self._check(child)

    def __call__(self, env: Mapping[str, Any]):
        try:
            return self._eval(self.tree, env)
        except KeyError as e:
            raise ConfigError(f"{self.where}: {self.text!r} reads {e.args[0]!r}, which is not set") from None
        except (ZeroDivisionError, TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{self.where}: {self.text!r} fails: {e}") from None

    def _eval(self, n, env):
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.BinOp):
            return _BINOPS[type(n.op)](self._eval(n.left, env), self._eval(n.right, env))
        if isinstance(n, ast.UnaryOp):
            v = self._eval(n.operand, env)
            return -v if isinstance(n.op, ast.USub) else not v
        if isinstance(n, ast.BoolOp):
            vals = (self._eval(v, env) for v in n.values)
            return all(vals) if isinstance(n.op, ast.And) else any(vals)
        if isinstance(n, ast.Compare):
            left = self._eval(n.left, env)
            for op, right_node in zip(n.ops, n.comparators):
                right = self._eval(right_node, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(n, ast.IfExp):
            return self._eval(n.body if self._eval(n.test, env) else n.orelse, env)
        if isinstance(n, ast.Tuple):
            return tuple(self._eval(e, env) for e in n.elts)
        if isinstance(n, ast.Call):
            return _FUNCTIONS[n.func.id](*(self._eval(a, env) for a in n.args))
        raise ConfigError(f"{self.where}: cannot evaluate {self.text!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True, slots=True)
class TensorTemplate:
    name: str  # "blk.{i}.attn_q.weight" for a per-layer tensor
    ne: tuple[Expr, ...]  # ggml order: ne[0] is the row length
    role: str
    when: Expr | None = None
    fill: str = "random"
    source_type: str | None = None  # the type the converter writes it in, when not BF16/F32

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor of a laid-out model."""

    name: str
    ne: tuple[int, ...]
    role: str
    fill: str
    source_type: str | None

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def is_float32(self) -> bool:
        """Written as F32 whatever the file type: 1-D tensors, norms, biases and the router
        (convert_hf_to_gguf.py; llama-quantize leaves them too)."""
        return len(self.ne) == 1 or self.role in ("norm", "bias", "router")


@dataclass(frozen=True, slots=True)
class GGUFKey:
    key: str  # without the "{arch}." prefix
    value: Expr | Any  # an Expr, or a literal
    per_layer: bool = False  # an array with one value per layer (the expression sees i)
    gguf_type: str | None = None  # "u32", "i32", "f32", "bool", "str": else by the value's type


@dataclass(frozen=True, slots=True)
class AttentionRules:
    """Sliding-window / chunked attention as the architecture's load_arch_hparams sets it up:
    every `swa_pattern`-th layer attends to everything, the others to `swa_window` tokens
    (llama_hparams::set_swa_pattern; a file's sliding_window(_pattern) keys override)."""

    swa_pattern: int = 0
    swa_dense_first: bool = False
    swa_window: int = 0
    zero_window_means_none: bool = False  # llama4: sliding_window = 0 turns chunking off
    kind: str = "standard"  # standard (sliding window) or chunked (llama4)


@dataclass(frozen=True, slots=True)
class Architecture:
    arch: str
    source: str
    required: tuple[str, ...]
    defaults: dict[str, Any]  # name -> literal or Expr of other hyperparameters
    zero_ok: frozenset[str]
    checks: tuple[tuple[Expr, str], ...]
    keys: tuple[GGUFKey, ...]
    head: tuple[TensorTemplate, ...]
    layer: tuple[TensorTemplate, ...]
    tail: tuple[TensorTemplate, ...]
    synth: dict[str, Any] = field(default_factory=dict)  # see synth.shape_for_size
    synth_note: str = ""
    description: str = ""
    # (name regex, role) per template, blk.{i} matching any block: how a real file's tensors are named
    patterns: tuple[tuple[re.Pattern, str], ...] = ()
    attention: "AttentionRules | None" = None

    def swa_layers(self, meta: Mapping[str, Any], n_layer: int) -> tuple[list[bool], int]:
        """Which layers attend to a window only, and the window (0: none), from a file's keys and
        the architecture's defaults, as llama.cpp's load_swa_pattern reads them."""
        rules = self.attention
        if rules is None or not rules.swa_pattern:
            return [False] * n_layer, 0
        window = meta.get(f"{self.arch}.attention.sliding_window", rules.swa_window)
        if type(window) is not int or window < 0:
            window = rules.swa_window
        if window == 0 and rules.zero_window_means_none:
            return [False] * n_layer, 0
        pattern = meta.get(f"{self.arch}.attention.sliding_window_pattern", rules.swa_pattern)
        if isinstance(pattern, list) and len(pattern) == n_layer:
            return [bool(x) for x in pattern], window
        if type(pattern) is not int or pattern < 0:
            pattern = rules.swa_pattern
        if rules.swa_dense_first:
            return [pattern == 0 or i % pattern != 0 for i in range(n_layer)], window
        return [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer)], window

    @property
    def names(self) -> tuple[str, ...]:
        return self.required + tuple(n for n in self.defaults if n not in self.required)

    # -- hyperparameters ------------------------------------------------------------------

    def hparams(self, given: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
        """Every hyperparameter: `given` checked (known, typed, positive, the arch's checks) and
        the defaults filled in."""
        where = where or f"{self.arch} model"
        unknown = set(given) - set(self.names)
        if unknown:
            raise ConfigError(f"{where}: {', '.join(sorted(unknown))} "
                              f"{'is' if len(unknown) == 1 else 'are'} not {self.arch} hyperparameters",
                              hint=f"{self.arch} has {', '.join(self.names)}")
        missing = [n for n in self.required if n not in given]
        if missing:
            raise ConfigError(f"{where}: {self.arch} needs {', '.join(missing)}")
        env: dict[str, Any] = {}
        for n in self.names:
            if n in given:
                env[n] = given[n]
            else:
                d = self.defaults[n]
                env[n] = d(env) if isinstance(d, Expr) else d
        for n, v in env.items():
            default = self.defaults.get(n)
            kind = type(default) if n in self.defaults and not isinstance(default, Expr) else int
            if kind is bool:
                ok = isinstance(v, bool)
            elif kind is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            elif kind is str:
                ok = isinstance(v, str)
            else:
                ok = type(v) is int
            if not ok:
                raise ConfigError(f"{where}: {n} is {v!r}, not a {kind.__name__}")
            if kind in (int, float) and (v < 0 or (v == 0 and n not in self.zero_ok)):
                raise ConfigError(f"{where}: {n} must be positive, got {v}")
        for expr, message in self.checks:
            if not expr(env):
                raise ConfigError(f"{where}: {message}",
                                  hint="; ".join(f"{n} = {env[n]}" for n in sorted(expr.names) if n in env))
        return env

    # -- tensors --------------------------------------------------------------------------

    def tensors(self, hp: Mapping[str, Any]) -> tuple[Tensor, ...]:
        """Every tensor llama.cpp loads for these hyperparameters, in the converter's order."""
        out: list[Tensor] = []

        def add(t: TensorTemplate, env: Mapping[str, Any], name: str) -> None:
            if t.when is not None and not t.when(env):
                return
            ne = tuple(int(e(env)) for e in t.ne)
            if any(d < 1 for d in ne):
                raise ConfigError(f"{self.arch}: {name} would have shape {ne}",
                                  hint=f"check the {self.arch} hyperparameters")
            out.append(Tensor(name, ne, t.role, t.fill, t.source_type))

        for t in self.head:
            add(t, hp, t.name)
        for i in range(hp["n_layer"]):
            env = dict(hp, i=i)
            for t in self.layer:
                add(t, env, t.name.replace("{i}", str(i)))
        for t in self.tail:
            add(t, hp, t.name)
        return tuple(out)

    def metadata(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """The `{arch}.*` GGUF keys llama.cpp reads, as the converter writes them."""
        meta = {}
        for k in self.keys:
            if k.per_layer:
                v = [k.value(dict(hp, i=i)) if isinstance(k.value, Expr) else k.value
                     for i in range(hp["n_layer"])]
            else:
                v = k.value(hp) if isinstance(k.value, Expr) else k.value
            meta[f"{self.arch}.{k.key}"] = v
        return meta

    def key_types(self) -> dict[str, str | None]:
        return {f"{self.arch}.{k.key}": k.gguf_type for k in self.keys}

    def role_of(self, tensor_name: str) -> str | None:
        """The role of a tensor of a real file by its name, or None if this table has no such tensor."""
        for pat, role in self.patterns:
            if pat.match(tensor_name):
                return role
        return None


# --------------------------------------------------------------------------------------------
# loading


_TOP_KEYS = {"arch", "source", "description", "required", "defaults", "zero_ok", "checks", "keys",
             "head", "layer", "tail", "synth", "synth_note", "attention"}
_TENSOR_KEYS = {"name", "ne", "role", "when", "fill", "source_type"}
_GGUF_TYPES = ("u32", "i32", "f32", "bool", "str")


def _tensor(t: dict, where: str, layer: bool) -> TensorTemplate:
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: a tensor must be a table")
    unknown = set(t) - _TENSOR_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a tensor needs a name")
    w = f"{where} {name}"
    if layer != ("{i}" in name):
        raise ConfigError(f"{w}: per-layer tensors are named blk.{{i}}.*, the others are not")
    ne = t.get("ne")
    if not isinstance(ne, list) or not 1 <= len(ne) <= 4:
        raise ConfigError(f"{w}: ne must be a list of 1 to 4 dimensions")
    role = t.get("role")
    if role not in ROLES:
        raise ConfigError(f"{w}: role {role!r} is not one of {', '.join(ROLES)}")
    fill = t.get("fill", "ones" if role == "norm" else "zeros" if role == "bias" else "random")
    if fill not in FILLS:
        raise ConfigError(f"{w}: fill {fill!r} is not one of {', '.join(FILLS)}")
    when = t.get("when")
    if when is not None and not isinstance(when, str):
        raise ConfigError(f"{w}: when must be an expression string")
    src = t.get("source_type")
    if src is not None and not isinstance(src, str):
        raise ConfigError(f"{w}: source_type must be a ggml type name")
    dims = tuple(Expr(str(d), w) for d in ne)
    return TensorTemplate(name, dims, role, Expr(when, w) if when else None, fill, src)


def _literal_or_expr(v, where: str, what: str):
    """A table value: a number or bool as it is, '...' a string literal, any other string an
    expression; anything else is an error naming `what` it should have been."""
    if isinstance(v, str) and len(v) >= 2 and v.startswith("'") and v.endswith("'"):
        return v[1:-1]
    if isinstance(v, str):
        return Expr(v, where)
    if isinstance(v, (bool, int, float)):
        return v
    raise ConfigError(f"{where}: {what}")


def parse_architecture(table: dict, where: str) -> Architecture:
    """One configs/architectures/*.toml table, every field checked."""
    unknown = set(table) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    arch = table.get("arch")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", arch or ""):
        raise ConfigError(f"{where}: arch must be llama.cpp's architecture name")
    source = table.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: every architecture says where its shapes come from (source)")
    required = table.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
        raise ConfigError(f"{where}: required must be a list of names")
    defaults_t = table.get("defaults", {})
    if not isinstance(defaults_t, dict):
        raise ConfigError(f"{where}: defaults must be a table")
    defaults: dict[str, Any] = {}
    for n, v in defaults_t.items():
        defaults[n] = _literal_or_expr(v, f"{where} defaults.{n}", "must be a number, bool, 'string' or expression")
    for n in ("n_layer", "n_embd", "n_vocab"):
        if n not in required:
            raise ConfigError(f"{where}: {n} must be required")
    checks = []
    for c in table.get("checks", []):
        if not (isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)):
            raise ConfigError(f"{where}: each check is [expression, message]")
        checks.append((Expr(c[0], f"{where} check"), c[1]))
    keys = []
    for k, v in table.get("keys", {}).items():
        w = f"{where} keys.{k}"
        per_layer, gtype = False, None
        if isinstance(v, dict):
            extra = set(v) - {"value", "per_layer", "type"}
            if extra or "value" not in v:
                raise ConfigError(f"{w}: a key table has value, and optionally per_layer and type")
            per_layer, gtype, v = bool(v.get("per_layer", False)), v.get("type"), v["value"]
            if gtype is not None and gtype not in _GGUF_TYPES:
                raise ConfigError(f"{w}: type {gtype!r} is not one of {', '.join(_GGUF_TYPES)}")
        value = _literal_or_expr(v, w, "a key's value is a number, bool, 'string' or expression")
        keys.append(GGUFKey(k, value, per_layer, gtype))
    parts = {}
    for part in ("head", "layer", "tail"):
        rows = table.get(part, [])
        if not isinstance(rows, list):
            raise ConfigError(f"{where}: {part} must be an array of tensor tables")
        parts[part] = tuple(_tensor(t, f"{where} {part}", part == "layer") for t in rows)
    if not parts["layer"]:
        raise ConfigError(f"{where}: an architecture has per-layer tensors")
    synth = table.get("synth", {})
    if not isinstance(synth, dict):
        raise ConfigError(f"{where}: synth must be a table")
    zero_ok = table.get("zero_ok", [])
    att = table.get("attention")
    rules = None
    if att is not None:
        if not isinstance(att, dict) or set(att) - {"swa_pattern", "swa_dense_first", "swa_window",
                                                     "zero_window_means_none", "kind"}:
            raise ConfigError(f"{where}: [attention] has swa_pattern, swa_dense_first, swa_window, "
                              "zero_window_means_none and kind")
        for k in ("swa_pattern", "swa_window"):
            if type(att.get(k, 0)) is not int or att.get(k, 0) < 0:
                raise ConfigError(f"{where}: attention.{k} must be a non-negative integer")
        if att.get("kind", "standard") not in ("standard", "chunked"):
            raise ConfigError(f"{where}: attention.kind is standard or chunked")
        rules = AttentionRules(**att)
    a = Architecture(arch=arch, source=source, required=tuple(required), defaults=defaults,
                     zero_ok=frozenset(zero_ok), checks=tuple(checks), keys=tuple(keys),
                     head=parts["head"], layer=parts["layer"], tail=parts["tail"], synth=synth,
                     synth_note=str(table.get("synth_note", "")),
                     description=str(table.get("description", "")), attention=rules,
                     patterns=tuple((re.compile("^" + re.escape(t.name).replace(re.escape("{i}"), r"\d+") + "$"),
                                     t.role) for t in (*parts["head"], *parts["layer"], *parts["tail"])))
    # Every name a shape or key reads is a hyperparameter (or the layer index).
    known = set(a.names) | {"i"}
    exprs = [e for t in (*a.head, *a.layer, *a.tail) for e in (*t.ne, t.when) if e is not None]
    exprs += [k.value for k in a.keys if isinstance(k.value, Expr)]
    exprs += [e for e, _ in a.checks] + [d for d in a.defaults.values() if isinstance(d, Expr)]
    for e in exprs:
        stray = e.names - known
        if stray:
            raise ConfigError(f"{e.where}: {e.text!r} reads {', '.join(sorted(stray))}, "
                              f"not a hyperparameter of {arch}")
    return a


@functools.lru_cache(maxsize=None)
def load_architectures() -> dict[str, Architecture]:
    """Every table in configs/architectures/, by architecture name."""
    out = {}
    for path in sorted(config_path(ARCH_DIR).glob("*.toml")):
        where = f"configs/{ARCH_DIR}/{path.name}"
        with path.open("rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{where}: {e}") from None
        a = parse_architecture(table, where)
        if a.arch != path.stem:
            raise ConfigError(f"{where}: arch {a.arch!r} must match the file name")
        out[a.arch] = a
    return out


def architecture(arch: str) -> Architecture:
    archs = load_architectures()
    if arch not in archs:
        raise ConfigError(f"cputune has no table for architecture {arch!r}",
                          hint="known: " + ", ".join(sorted(archs)))
    return archs[arch]


def known() -> tuple[str, ...]:
    return tuple(sorted(load_architectures()))


def role_of(arch: str, tensor_name: str) -> str | None:
    """The role of a real file's tensor, from its architecture's table (None: no table, or a
    tensor the table does not have)."""
    a = load_architectures().get(arch)
    return a.role_of(tensor_name) if a else None
