"""The trainer's config tree: keyword-only, frozen dataclasses (`xtoken_core.config`), one per part.

    TrainConfig
    ├── student: StudentConfig          the model being trained and its tokenizer
    ├── teachers: [TeacherConfig, ...]  each cross-tokenizer (projection) or same-vocab
    │   └── pretrain: PretrainConfig    optional: train this (tiny) teacher first, CE only, cached
    ├── data: DataConfig                JSONL files, global batch, microbatches, budget
    ├── loss: LossConfig                KD/CE weights + `multi_teacher: MultiTeacherConfig`
    ├── optim: OptimConfig              AdamW, clipping, the NaN/inf guard
    ├── schedule: ScheduleConfig        warmup + cosine over `total_steps` (never `max_steps`)
    ├── parallel: ParallelConfig        device, mixed precision
    ├── checkpoint: CheckpointConfig    every, keep
    ├── eval: EvalConfig                held-out BPB every N steps
    └── log: LogConfig                  metrics.jsonl cadence, progress bar

Every class validates its fields when built; `load_config` turns YAML files and dotted overrides
into a `TrainConfig`, with messages that name the key (`teachers.0.weight`). docs/trainer.md's
config reference is generated from these classes (`config_reference`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml

from xtoken_core.config import MAX_TOKENS, Config, config, fields_of, format_bound, option
from xtoken_core.errors import ConfigError
from xtoken_loss import registry
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig


class TrainConfigError(ConfigError):
    """An invalid trainer config: unknown key, wrong type or value, missing file or artifact."""


class _Base(Config):
    error_type: ClassVar[type[ConfigError]] = TrainConfigError


MODEL_KEYS = {
    "architecture": True, "hidden_size": True, "num_layers": True, "num_heads": True, "intermediate_size": True,
    "num_kv_heads": False, "max_position_embeddings": False, "tie_word_embeddings": False,
}
ARCHITECTURES = ("llama", "qwen3")


def check_model_spec(where: str, model) -> None:
    """A model is a name/path string or a mapping of the tiny-model keys (`MODEL_KEYS`)."""
    if isinstance(model, str):
        if not model:
            raise TrainConfigError(f"{where} is empty: give a model path, a Hub name or a mapping with "
                                   "architecture, hidden_size, ...")
        return
    if not isinstance(model, Mapping):
        raise TrainConfigError(f"{where} must be a path/name or a mapping, got {type(model).__name__}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are "
                               + ", ".join(MODEL_KEYS))
    missing = [k for k, req in MODEL_KEYS.items() if req and k not in model]
    if missing:
        raise TrainConfigError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    if model["architecture"] not in ARCHITECTURES:
        raise TrainConfigError(f"{where}.architecture={model['architecture']!r}: valid values are "
                               + ", ".join(map(repr, ARCHITECTURES)))
    for k, v in model.items():
        if k == "architecture":
            continue
        want_bool = k == "tie_word_embeddings"
        ok = isinstance(v, bool) if want_bool else (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20)
        if not ok:
            raise TrainConfigError(f"{where}.{k} must be {'a bool' if want_bool else 'a positive integer'}, got {v!r}")


@config
class StudentConfig(_Base):
    """The model being trained."""

    tokenizer: str = option(help="fixture name, tokenizer directory/file or Hub name")
    model: Any = option(help="model directory or Hub name, or a mapping for a tiny model built from a config "
                             "(architecture, hidden_size, num_layers, num_heads, intermediate_size, ...)")
    restrict_vocab: bool = option(False, help="give the model rows only for the token ids the data files use "
                                              "(a small-scale device for tiny CPU models; not for real models)")
    activation_checkpointing: bool = option(False, help="recompute each decoder block in the backward pass")

    def check(self) -> None:
        check_model_spec("StudentConfig.model", self.model)


@config
class PretrainConfig(_Base):
    """Train a teacher first, CE only, with the same trainer (tiny demo teachers must know
    something). The result is cached outside `output_dir`, keyed by this resolved config."""

    max_steps: int = option(min=1, help="optimizer steps of the pre-training run")
    lr: float = option(3e-3, gt=0, max=10, help="peak learning rate")
    warmup_steps: int = option(10, min=0, help="linear warmup steps")
    batch_size: int | None = option(None, min=1, help="sequences per step (None: data.batch_size)")
    seed: int = option(0, min=0, help="seed of the teacher's initialisation and data order")


@config
class TeacherConfig(_Base):
    """One teacher: cross-tokenizer (with a projection) or same-vocab (the student's tokenizer)."""

    name: str = option(help="label in metrics and messages")
    tokenizer: str = option(help="fixture name, tokenizer directory/file or Hub name")
    model: Any = option(help="model directory or Hub name, or a tiny-model mapping (with `pretrain`)")
    loss: str = option(help="loss kind: " + ", ".join(registry.teacher_kinds()))
    weight: float = option(1.0, min=0, help="static weight (the prior of dynamic weights)")
    projection: str | None = option(None, help="projection artifact directory, or 'auto' (built into the cache); "
                                               "for the kinds that need one")
    projection_trainable: bool = option(False, help="train the projection W (LearnedProjection); exported at the end")
    loss_options: dict = option(default_factory=dict, help="options of the loss kind (temperature, direction, ...)")
    offload: bool = option(False, help="keep the teacher's parameters on the CPU between uses (GPU)")
    top_k: int | None = option(None, min=1, help="give the loss the teacher's top-K log-probabilities (+ the realised "
                                                 "token's and the rest mass's) instead of its full logits, rounded "
                                                 "to top_k_dtype as a teacher cache stores them")
    top_k_dtype: Literal["bfloat16", "float16"] = option("bfloat16", help="storage dtype of the top-k "
                                                                          "log-probabilities (with top_k)")
    cache: str | None = option(None, help="teacher-cache directory (`xtoken-train cache-teacher`): read this "
                                          "teacher's top-k outputs from it instead of running the model")
    pretrain: PretrainConfig | None = option(None, help="pre-train this teacher first (CE only), cached")

    def check(self) -> None:
        check_model_spec("TeacherConfig.model", self.model)
        spec = registry.REGISTRY.get(self.loss)
        if spec is None or not spec.uses_teacher:
            raise self.fail(f"loss={self.loss!r}: valid kinds are " + ", ".join(map(repr, registry.teacher_kinds())))
        if spec.needs_projection and self.projection is None:
            raise self.fail(f"loss {self.loss!r} of teacher {self.name!r} needs a projection: give an artifact "
                            "directory or 'auto'")
        if not spec.needs_projection and self.projection is not None:
            raise self.fail(f"loss {self.loss!r} of teacher {self.name!r} takes no projection; remove it")
        if self.projection_trainable and self.loss != "pkl":
            raise self.fail(f"projection_trainable needs loss 'pkl', teacher {self.name!r} has {self.loss!r}")
        if self.pretrain is not None and isinstance(self.model, str):
            raise self.fail(f"pretrain needs a model built from a config (a mapping), teacher {self.name!r} names "
                            f"{self.model!r}")
        if self.top_k is not None or self.cache is not None:
            what = "cache" if self.cache is not None else "top_k"
            if "topk" not in spec.teacher_forms:
                raise self.fail(f"{what}: loss {self.loss!r} of teacher {self.name!r} does not take top-k teacher "
                                "outputs")
            opts = dict(self.loss_options) if isinstance(self.loss_options, Mapping) else {}
            if opts.get("public"):
                raise self.fail(f"{what}: teacher {self.name!r} has loss_options.public=true, which needs the "
                                "teacher's full logits; the top-k form is for the principled losses")
            if opts.get("temperature", 1.0) != 1.0:
                raise self.fail(f"{what}: teacher {self.name!r} has loss_options.temperature="
                                f"{opts['temperature']}; top-k log-probabilities are stored at temperature 1")
        if not isinstance(self.loss_options, Mapping):
            raise self.fail("loss_options must be a mapping")
        try:
            spec.build_options(**dict(self.loss_options))
        except ConfigError as exc:
            raise self.fail(f"loss_options of teacher {self.name!r}: {exc}") from None

    @property
    def same_vocab(self) -> bool:
        return registry.REGISTRY[self.loss].same_vocab


@config
class DataConfig(_Base):
    """Training and held-out data: JSONL with `text` or chat `messages` per line."""

    train: str = option(help="training JSONL file")
    eval: str | None = option(None, help="held-out JSONL file (eval/bpb; None: no evaluation)")
    batch_size: int = option(8, min=1, help="global batch: sequences per optimizer step, over all ranks and "
                                            "microbatches")
    microbatch_size: int | None = option(None, min=1, help="sequences per forward on each rank (None: the rank's "
                                                           "whole share, no accumulation)")
    max_length: int = option(512, min=8, max=MAX_TOKENS, help="student tokens per sequence; every side is cut at "
                                                              "one shared byte boundary")
    teacher_max_length: int | None = option(None, min=8, max=MAX_TOKENS,
                                            help="each teacher's token budget (None: max_length); a tokenizer "
                                                 "that needs more tokens for the same text otherwise cuts the "
                                                 "student's sequence short")
    train_on: Literal["assistant", "all"] = option("assistant", help="chat data: train on the assistant messages' "
                                                                      "bytes only, or on all message bytes")
    num_workers: int = option(1, min=0, max=64, help="DataLoader worker processes (tokenize + align)")
    bucket_batches: int = option(16, min=1, help="global batches per length-sorted window (less padding)")


@config
class LossConfig(_Base):
    """The step's loss: `ce_weight * CE + kd_weight * (teachers combined by `multi_teacher`)`, each
    term summed over the step and divided by its own global unit count."""

    kd_weight: float = option(1.0, min=0, help="weight of the combined KD term")
    ce_weight: float = option(1.0, min=0, help="weight of the student's next-token CE")
    multi_teacher: MultiTeacherConfig = option(default_factory=MultiTeacherConfig,
                                               help="how the teachers combine (mode, weighting, score, ...)")

    def check(self) -> None:
        if not isinstance(self.multi_teacher, MultiTeacherConfig):
            raise self.fail("multi_teacher must be a mapping of MultiTeacherConfig fields")


@config
class OptimConfig(_Base):
    """AdamW with gradient clipping and a guard against non-finite steps."""

    lr: float = option(1e-3, gt=0, max=10, help="peak learning rate")
    weight_decay: float = option(0.01, min=0, max=10, help="AdamW weight decay")
    beta1: float = option(0.9, min=0, max=0.999999, help="AdamW beta1")
    beta2: float = option(0.95, min=0, max=0.999999, help="AdamW beta2")
    eps: float = option(1e-8, gt=0, max=1, help="AdamW epsilon")
    grad_clip: float | None = option(1.0, gt=0, help="max gradient norm (None: no clipping)")
    max_bad_steps: int = option(5, min=1, help="stop after this many consecutive steps with a non-finite loss or "
                                               "gradient (each is skipped and counted)")
    projection_lr: float | None = option(None, gt=0, max=10, help="learning rate of trainable projections "
                                                                  "(None: lr)")


@config
class ScheduleConfig(_Base):
    """Linear warmup then cosine decay to `min_lr_ratio * lr` at `total_steps` (independent of
    `max_steps`, so a run stopped early and resumed follows the same curve)."""

    total_steps: int = option(min=1, help="length of the schedule")
    warmup_steps: int = option(0, min=0, help="linear warmup steps")
    min_lr_ratio: float = option(0.1, min=0, max=1, help="final learning rate / peak")

    def check(self) -> None:
        if self.warmup_steps > self.total_steps:
            raise self.fail(f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")


@config
class ParallelConfig(_Base):
    """Where and how the step runs (the process layout comes from the launcher: torchrun, SLURM)."""

    device: Literal["auto", "cpu", "cuda"] = option("auto", help="'auto': CUDA with NCCL when available, else CPU "
                                                                  "with gloo")
    mixed_precision: Literal["auto", "bf16", "none"] = option("auto", help="'auto': bf16 parameters with fp32 "
                                                                            "reduction on CUDA, none on CPU")


@config
class CheckpointConfig(_Base):
    every: int | None = option(None, min=1, help="checkpoint every N steps (the last step always is)")
    keep: int = option(2, min=2, help="latest checkpoints kept")


@config
class EvalConfig(_Base):
    every: int | None = option(None, min=1, help="evaluate every N steps (None: at the end only)")
    batch_size: int = option(8, min=1, help="held-out sequences per forward")
    max_batches: int | None = option(None, min=1, help="held-out batches per evaluation (None: all)")


@config
class LogConfig(_Base):
    every: int = option(1, min=1, help="a metrics.jsonl line every N steps")
    progress: bool = option(True, help="progress bar on rank 0")


@config
class TrainConfig(_Base):
    """The whole run (module doc)."""

    output_dir: str = option(help="run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    max_steps: int = option(min=1, help="where this run stops (the schedule's length is schedule.total_steps)")
    seed: int = option(0, min=0, help="model initialisation and data order (never the world size)")
    resume: bool = option(False, help="continue from the latest checkpoint in output_dir")
    student: StudentConfig = option(help="the student")
    teachers: tuple = option(default_factory=tuple, help="the teachers, a list of TeacherConfig mappings")
    data: DataConfig = option(help="the data")
    loss: LossConfig = option(default_factory=LossConfig, help="the loss")
    optim: OptimConfig = option(default_factory=OptimConfig, help="the optimizer")
    schedule: ScheduleConfig = option(help="the learning-rate schedule")
    parallel: ParallelConfig = option(default_factory=ParallelConfig, help="device and precision")
    checkpoint: CheckpointConfig = option(default_factory=CheckpointConfig, help="checkpoints")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation")
    log: LogConfig = option(default_factory=LogConfig, help="metrics and progress")

    def check(self) -> None:
        if not all(isinstance(t, TeacherConfig) for t in self.teachers):
            raise self.fail("teachers must be a list of TeacherConfig")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise self.fail(f"teacher names must be distinct, got {names}")
        if not self.teachers and self.loss.ce_weight == 0:
            raise self.fail("no teachers and loss.ce_weight=0: nothing to train on")
        trainable = any(t.projection_trainable for t in self.teachers)
        if trainable and self.loss.multi_teacher.mode != "sum":
            raise self.fail("projection_trainable needs loss.multi_teacher.mode='sum'")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["teachers"] = [t.to_dict() for t in self.teachers]
        return out

    @classmethod
    def from_dict(cls, data):
        data = dict(data or {})
        teachers = data.get("teachers", ())
        if teachers is None:
            teachers = ()
        if not isinstance(teachers, (list, tuple)):
            raise TrainConfigError(f"teachers must be a list of mappings, got {type(teachers).__name__}")
        built = []
        for i, t in enumerate(teachers):
            if not isinstance(t, Mapping):
                raise TrainConfigError(f"teachers.{i} must be a mapping, got {type(t).__name__}")
            built.append(at_key(f"teachers.{i}", lambda: TeacherConfig.from_dict(t)))
        data["teachers"] = tuple(built)
        for name in ("student", "data", "loss", "optim", "schedule", "parallel", "checkpoint", "eval", "log"):
            if name in data:
                value = data[name]
                if not isinstance(value, Mapping):
                    raise TrainConfigError(f"{name} must be a mapping, got {value!r}")
                sub = typing.get_type_hints(cls)[name]
                data[name] = at_key(name, lambda: _sub_from_dict(sub)(value))
        for name in ("student", "data", "schedule"):
            if name not in data:
                raise TrainConfigError(f"{name} is missing: the config must have a `{name}:` section")
        return super().from_dict(data)


def _sub_from_dict(cls):
    def build(value):
        value = dict(value)
        if cls is LossConfig and isinstance(value.get("multi_teacher"), Mapping):
            mt = value["multi_teacher"]
            value["multi_teacher"] = at_key("multi_teacher", lambda: MultiTeacherConfig.from_dict(mt))
        return cls.from_dict(value)
    return build


def at_key(where: str, fn):
    """`fn()`, with a config error's message prefixed by the config key it concerns."""
    try:
        return fn()
    except ConfigError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


# -------------------------------------------------------------------------------------------------
# files and overrides

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; people write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$
               |^[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""",
               re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)

def read_yaml(path: str | Path) -> dict:
    """One config file: a YAML mapping."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TrainConfigError(f"config file {p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"config file {p}: expected a mapping at the top, got {type(data).__name__}")
    return data


def merge(base: dict, over: Mapping) -> dict:
    """`over` merged into `base`: mappings recursively, everything else (lists included) replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(data: dict, item: str) -> dict:
    """`key.sub=value` (value parsed as YAML: numbers, true/false, null, lists) applied to `data`;
    a number in the path indexes a list (`teachers.0.weight=0.5`)."""
    if "=" not in item:
        raise TrainConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise TrainConfigError(f"override {item!r}: empty key part")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out = _copy(data)
    node = out
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            node = node[_index(node, part, here, item)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            elif not isinstance(node[part], (dict, list)):
                raise TrainConfigError(f"override {item!r}: {here} is a value, not a section")
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key, item)] = value
    else:
        node[last] = value
    return out


def _index(node: list, part: str, here: str, item: str) -> int:
    if not part.isdigit():
        raise TrainConfigError(f"override {item!r}: {here} indexes a list, use a number")
    i = int(part)
    if i >= len(node):
        raise TrainConfigError(f"override {item!r}: {here}: the list has {len(node)} entries")
    return i


def _copy(x):
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def _normalise(x):
    """Tuples (from `to_dict`) as lists, so YAML and comparisons see one shape."""
    if isinstance(x, dict):
        return {k: _normalise(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normalise(v) for v in x]
    return x


def load_config(files: list[str | Path], overrides: list[str] = ()) -> TrainConfig:
    """The `TrainConfig` of `--config` files (later ones merged over earlier ones, a list replaced
    whole) and dotted `key=value` overrides, validated."""
    data: dict = {}
    for f in files:
        data = merge(data, read_yaml(f))
    for item in overrides:
        data = apply_override(data, item)
    return TrainConfig.from_dict(data)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(_normalise(cfg.to_dict()), sort_keys=False)


# Keys a resume may change: where the run stops, and how it logs, evaluates and checkpoints.
RESUMABLE_CHANGES = ("max_steps", "resume", "log", "eval", "checkpoint", "data.num_workers", "parallel")


def resume_changes(saved: Mapping, current: Mapping) -> list[str]:
    """Dotted keys whose values differ between a saved resolved config and the current one, outside
    `RESUMABLE_CHANGES`."""
    out: list[str] = []

    def walk(a, b, path):
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}.{i}")
        elif a != b:
            out.append(path)

    walk(_normalise(dict(saved)), _normalise(dict(current)), "")
    return out


# -------------------------------------------------------------------------------------------------
# the reference table of docs/trainer.md

SECTIONS = (
    ("", TrainConfig), ("student", StudentConfig), ("teachers.N", TeacherConfig),
    ("teachers.N.pretrain", PretrainConfig), ("data", DataConfig), ("loss", LossConfig),
    ("loss.multi_teacher", MultiTeacherConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
    ("parallel", ParallelConfig), ("checkpoint", CheckpointConfig), ("eval", EvalConfig), ("log", LogConfig),
)


def _default_text(f) -> str:
    d = f.default
    if d is dataclasses.MISSING:
        return "**required**"
    if isinstance(d, Config):
        return "(section)"
    if isinstance(d, (dict, tuple)) and not d:
        return "`{}`" if isinstance(d, dict) else "`[]`"
    if isinstance(d, float):
        return f"`{format_bound(d)}`"
    return f"`{yaml.safe_dump(d).strip().removesuffix('...').strip()}`"


def config_reference() -> str:
    """The markdown config reference (one table per section), generated from the classes."""
    lines: list[str] = []
    for prefix, cls in SECTIONS:
        title = prefix or "top level"
        lines += [f"### `{title}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| key | default | meaning |", "| --- | --- | --- |"]
        for f in fields_of(cls):
            if prefix == "" and f.name in {p for p, _ in SECTIONS}:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            help_ = f.help.replace("|", "\\|")
            if f.choices:
                help_ += " (" + ", ".join(f"`{c}`" for c in f.choices) + ")"
            lines.append(f"| `{key}` | {_default_text(f)} | {help_} |")
        lines.append("")
    return "\n".join(lines)


REFERENCE_BEGIN = "<!-- config reference: generated by `python -m xtoken_loss.trainer.config`; do not edit -->"
REFERENCE_END = "<!-- end of the generated config reference -->"


def update_reference(doc: Path) -> None:
    """Rewrite the generated block of `doc` (docs/trainer.md) from the classes."""
    text = doc.read_text(encoding="utf-8")
    a, b = text.index(REFERENCE_BEGIN) + len(REFERENCE_BEGIN), text.index(REFERENCE_END)
    doc.write_text(text[:a] + "\n\n" + config_reference() + "\n" + text[b:], encoding="utf-8")


if __name__ == "__main__":
    update_reference(Path(__file__).resolve().parents[2] / "docs" / "trainer.md")
