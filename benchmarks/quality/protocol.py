"""The benchmark's configurations (sizes, steps, learning rates), its arms, and each arm's trainer config.

The protocol (student and teacher sizes, steps, learning rate, batch) was fixed from the CE-only demo
student of `data/configs/demo.yaml` before any KD arm was run, and is the same for every arm and seed;
only the teachers and the loss differ between arms.

An arm's teachers are "qwen3" (cross-tokenizer, the qwen3 tokenizer) and "llama3" (same-vocab, the
student's tokenizer): one architecture and pre-training budget (`Protocol.teacher`, CE only, through the
trainer's `teachers.N.pretrain`, cached in `$XTOKEN_CACHE/teachers/`, `pretrain_config`), then named by
their `final/` directories in the arms. They are listed in that order
whenever both appear, so teacher index 0 is qwen3 in every two-teacher arm. A teacher is read from its
top-k cache (`source="cache"`) or run online with full logits (`source="online"`: the public forms,
which read the whole distribution, and the full-logit side of the cache ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUDENT_TOKENIZER = "llama3"
CROSS, SAME = "qwen3", "llama3"  # teacher names = their tokenizers
PROJECTION_KINDS = ("pkl", "hkl", "gold")  # the kinds that read a vocabulary projection


def llama(hidden: int, layers: int, heads: int, mlp: int, positions: int) -> dict:
    """A tiny Llama-architecture model mapping (`student.model` / `teachers.N.model`)."""
    return {"architecture": "llama", "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
            "intermediate_size": mlp, "max_position_embeddings": positions}


@dataclass(frozen=True)
class Protocol:
    """One configuration of the benchmark. `train_lines` / `heldout_lines`: use only the first lines of
    the bundled splits (None: the whole split; the held-out subset always keeps the digit-heavy documents
    so that the digit BPB is defined). `teacher_max_length` is 4 x `max_length`, the characters of a
    sample piece (`run.sample_max_chars`): a teacher's budget then never cuts the student's sequence
    short (qwen3 needs up to ~3x llama3's tokens on digits), so every arm trains and is evaluated on the
    same student tokens as CE only."""

    name: str
    student: dict
    teacher: dict
    steps: int
    lr: float
    warmup: int
    teacher_steps: int
    teacher_lr: float
    teacher_warmup: int
    batch_size: int
    max_length: int
    teacher_max_length: int
    eval_every: int
    eval_batch_size: int
    top_k: int
    seeds: int
    cache_batch_size: int
    device: str = "auto"
    train_lines: int | None = None
    heldout_lines: int | None = None
    strict_rows: bool = True  # refuse (not just report) arm token ids the pre-trained teachers lack (teachers.py)
    description: str = ""

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "description"}


PROTOCOLS: dict[str, Protocol] = {
    # 2 CPU cores, ~85-90 minutes with the teachers and caches (~75 once cached: docs/quality.md).
    # Student = the demo's (hidden 96, 2 layers, lr 3e-3, 8 x 128 tokens per step); teachers = the
    # demo's teacher size, pre-trained 2.5x longer.
    "default": Protocol(
        name="default", student=llama(96, 2, 4, 256, 256), teacher=llama(192, 3, 4, 512, 512),
        steps=100, lr=3e-3, warmup=10, teacher_steps=400, teacher_lr=3e-3, teacher_warmup=20,
        batch_size=8, max_length=128, teacher_max_length=512, eval_every=50, eval_batch_size=16,
        top_k=64, seeds=3, cache_batch_size=16, device="cpu",
        description="2 CPU cores: the demo's student and teacher sizes, 100 student steps"),
    # One H200 (documented; run there when a device is lent): larger models, longer sequences and runs.
    "gpu": Protocol(
        name="gpu", student=llama(256, 4, 8, 768, 512), teacher=llama(512, 6, 8, 1536, 1024),
        steps=600, lr=2e-3, warmup=30, teacher_steps=3000, teacher_lr=2e-3, teacher_warmup=100,
        batch_size=32, max_length=256, teacher_max_length=1024, eval_every=100, eval_batch_size=64,
        top_k=64, seeds=3, cache_batch_size=64, device="cuda",
        description="one H200: 4x wider student, 6-layer teachers, 600 student steps of 32 x 256 tokens"),
    # Development only (minutes): tiny models, a slice of the corpus, one seed. Its numbers mean nothing.
    "smoke": Protocol(
        name="smoke", student=llama(32, 1, 2, 64, 256), teacher=llama(48, 1, 2, 96, 256),
        steps=8, lr=1e-2, warmup=2, teacher_steps=12, teacher_lr=1e-2, teacher_warmup=2,
        batch_size=4, max_length=64, teacher_max_length=256, eval_every=4, eval_batch_size=16,
        top_k=16, seeds=1, cache_batch_size=16, device="cpu", train_lines=24, heldout_lines=6,
        strict_rows=False,
        description="development: tiny models, the first 24 train lines, 8 steps (numbers mean nothing)"),
}


@dataclass(frozen=True)
class TeacherUse:
    """One teacher of an arm: which one, its loss kind and options, its static weight, and whether it
    is read from its top-k cache or run online with full logits."""

    name: str
    loss: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)
    source: str = "cache"  # "cache" | "online"


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    teachers: tuple[TeacherUse, ...] = ()
    multi_teacher: dict = field(default_factory=dict)
    role: str = ""  # what the RESULT definitions use it for (result.py)


PUBLIC = {"public": True}
# The two-teacher arms use P-KL for the cross-tokenizer teacher, fixed before any run (not the best cross loss).
_PAIR_STATIC = (TeacherUse(CROSS, "pkl", 0.8), TeacherUse(SAME, "kl", 0.2))
_PAIR_EQUAL = (TeacherUse(CROSS, "pkl"), TeacherUse(SAME, "kl"))

ARMS: tuple[Arm, ...] = (
    Arm("ce", "CE only", role="baseline"),
    Arm("same_kl", "same-vocab KD (llama3, KL)", (TeacherUse(SAME, "kl"),), role="same-vocab"),
    Arm("pkl", "P-KL (qwen3)", (TeacherUse(CROSS, "pkl"),), role="cross candidate"),
    Arm("hkl", "H-KL (qwen3)", (TeacherUse(CROSS, "hkl"),), role="cross candidate"),
    Arm("alm", "ALM (qwen3)", (TeacherUse(CROSS, "alm"),), role="cross candidate"),
    Arm("gold", "GOLD (qwen3)", (TeacherUse(CROSS, "gold"),), role="comparison"),
    Arm("uld", "ULD (qwen3)", (TeacherUse(CROSS, "uld"),), role="comparison"),
    Arm("public_pkl", "P-KL public (qwen3, online)", (TeacherUse(CROSS, "pkl", options=PUBLIC, source="online"),),
        role="comparison"),
    Arm("public_gold", "GOLD public (qwen3, online)",
        (TeacherUse(CROSS, "gold", options=PUBLIC, source="online"),), role="comparison"),
    Arm("sum_static", "2 teachers, sum 0.8/0.2", _PAIR_STATIC, {"mode": "sum", "weighting": "static"},
        role="multi"),
    Arm("sum_dynamic", "2 teachers, sum dynamic (BPB)", _PAIR_EQUAL,
        {"mode": "sum", "weighting": "dynamic", "score": "bpb"}, role="multi"),
    Arm("select", "2 teachers, select_teacher (BPB)", _PAIR_EQUAL, {"mode": "select_teacher", "score": "bpb"},
        role="multi"),
    Arm("pkl_full", "P-KL full logits (qwen3, online)", (TeacherUse(CROSS, "pkl", source="online"),),
        role="cache ablation"),
)
ARM_NAMES = tuple(a.name for a in ARMS)


def arm(name: str) -> Arm:
    for a in ARMS:
        if a.name == name:
            return a
    raise KeyError(f"no arm {name!r}; the arms are {', '.join(ARM_NAMES)}")


def teacher_entry(name: str, loss: str, model, *, weight: float = 1.0, options: dict | None = None,
                  cache: str | None = None) -> dict:
    """`teachers.N` of teacher `name` (`model`: its pre-trained `final/` directory); read from its top-k
    `cache` when given."""
    t = {"name": name, "tokenizer": name, "model": model, "loss": loss, "weight": weight,
         "loss_options": dict(options or {})}
    if loss in PROJECTION_KINDS:
        t["projection"] = "auto"
    if cache is not None:
        t["cache"] = str(cache)
    return t


def base_config(p: Protocol, train: str, heldout: str, *, seed: int = 0, output_dir: str = "unused") -> dict:
    """The CE-only student run of protocol `p` (every arm adds its teachers to this)."""
    return {
        "output_dir": str(output_dir), "max_steps": p.steps, "seed": seed,
        "student": {"tokenizer": STUDENT_TOKENIZER, "model": dict(p.student), "restrict_vocab": True},
        "teachers": [],
        "data": {"train": str(train), "eval": str(heldout), "batch_size": p.batch_size, "max_length": p.max_length,
                 "teacher_max_length": p.teacher_max_length, "num_workers": 1},
        "loss": {"kd_weight": 1.0, "ce_weight": 1.0, "multi_teacher": {"mode": "sum", "projection_accuracy": False}},
        "optim": {"lr": p.lr},
        "schedule": {"total_steps": p.steps, "warmup_steps": p.warmup},
        "eval": {"every": p.eval_every, "batch_size": p.eval_batch_size},
        "log": {"progress": False},
        "parallel": {"device": p.device},
    }


def pretrain_config(p: Protocol, train: str, heldout: str) -> dict:
    """The config whose `teachers.N.pretrain` pre-trains both teachers (CE only, the trainer's cached
    pre-training; qwen3 first). Its context is the teacher budget, `p.teacher_max_length` tokens, with
    the student's tokens per step (`batch_size * max_length`): a teacher must know every position it is
    asked about in the arms (qwen3 needs more tokens than llama3 for the student's bytes). Its long
    samples are pieces of `4 * teacher_max_length` characters; on the bundled corpus they use exactly
    the token ids of the arms' pieces (checked when written), so the restricted rows are the same."""
    cfg = base_config(p, train, heldout)
    cfg["data"]["max_length"] = p.teacher_max_length
    cfg["data"]["teacher_max_length"] = None
    batch = max(1, p.batch_size * p.max_length // p.teacher_max_length)
    pre = {"max_steps": p.teacher_steps, "lr": p.teacher_lr, "warmup_steps": p.teacher_warmup, "batch_size": batch}
    cfg["teachers"] = [{"name": n, "tokenizer": n, "model": dict(p.teacher), "loss": loss, "pretrain": dict(pre)}
                       for n, loss in ((CROSS, "uld"), (SAME, "kl"))]  # the loss is not used in pre-training
    return cfg


def teachers_config(p: Protocol, train: str, heldout: str, models: dict[str, str]) -> dict:
    """An arm-shaped config with both teachers (qwen3 first, `models`: name -> pre-trained directory):
    what their caches are written from."""
    cfg = base_config(p, train, heldout)
    cfg["teachers"] = [teacher_entry(CROSS, "pkl", models[CROSS]), teacher_entry(SAME, "kl", models[SAME])]
    return cfg


def arm_config(p: Protocol, a: Arm, seed: int, output_dir: str, train: str, heldout: str,
               models: dict[str, str], caches: dict[str, str]) -> dict:
    """The trainer config (a plain dict for `TrainConfig.from_dict`) of arm `a`, seed `seed`; `models`
    and `caches`: teacher name -> its pre-trained model directory / its top-k cache directory."""
    cfg = base_config(p, train, heldout, seed=seed, output_dir=output_dir)
    cfg["teachers"] = [teacher_entry(t.name, t.loss, models[t.name], weight=t.weight, options=t.options,
                                     cache=caches[t.name] if t.source == "cache" else None) for t in a.teachers]
    cfg["loss"]["multi_teacher"].update(a.multi_teacher)
    return cfg
