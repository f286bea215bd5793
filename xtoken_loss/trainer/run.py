"""`train(cfg)`: one run of the reference trainer, from a validated `TrainConfig` to `final/`.

Order: preflight (tokenizers, artifacts, run directory: no model loaded) -> process group ->
cached inputs (teacher pre-training, vocabulary remaps, projections) -> models (built, restricted,
sharded; teachers frozen) -> optimizer, schedule, resume -> the loop (data, step, metrics, eval,
checkpoints) -> final checkpoint, evaluation and the Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xtoken_loss.losses.learned_pkl import LearnedProjection, learned_pkl_loss
from xtoken_loss.multi_teacher.aggregate import MultiTeacherLoss
from xtoken_loss.multi_teacher.teachers import TeacherSpec
from xtoken_loss.projection import load_projection
from xtoken_loss.trainer import checkpoint as ckpt
from xtoken_loss.trainer import data as data_mod
from xtoken_loss.trainer import models
from xtoken_loss.trainer.config import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    ScheduleConfig,
    StudentConfig,
    TrainConfig,
    TrainConfigError,
    at_key,
    read_yaml,
    resume_changes,
    to_yaml,
)
from xtoken_loss.trainer.distributed import init_distributed, use_cpu_huge_pages
from xtoken_loss.trainer.evaluate import evaluate
from xtoken_loss.trainer.export import export_hf
from xtoken_loss.trainer.metrics import METRICS_FILE, MetricsLog, Progress, read_metrics
from xtoken_loss.trainer.prepare import (
    RUN_MARKER,
    Sides,
    auto_projection,
    cache_lock,
    cache_root,
    config_key,
    preflight,
)
from xtoken_loss.trainer.schedule import build_scheduler
from xtoken_loss.trainer.step import StepRunner, TeacherRuntime
from xtoken_loss.trainer.vocab_remap import build_remap, file_sha256, remap_projection


@dataclass
class RunSummary:
    """What a finished run reports (rank 0 prints it as a table)."""

    output_dir: Path
    steps: int
    first_eval: dict | None
    last_eval: dict | None
    teacher_names: list[str]


# -------------------------------------------------------------------------------------------------
# teacher pre-training (the demo's tiny teachers must know something)

def pretrain_config(cfg: TrainConfig, i: int) -> TrainConfig:
    """The CE-only run that pre-trains teacher i, in the cache, keyed by what determines it."""
    t = cfg.teachers[i]
    p = t.pretrain
    key_src = {
        "model": t.model, "tokenizer": t.tokenizer, "pretrain": p.to_dict(),
        "train": file_sha256(cfg.data.train), "eval": file_sha256(cfg.data.eval) if cfg.data.eval else None,
        "max_length": cfg.data.max_length, "train_on": cfg.data.train_on, "restrict": cfg.student.restrict_vocab,
    }
    out = cache_root() / "teachers" / f"{t.name}-{config_key(key_src)}"
    return TrainConfig(
        output_dir=str(out), max_steps=p.max_steps, seed=p.seed, resume=True,
        student=StudentConfig(tokenizer=t.tokenizer, model=t.model, restrict_vocab=cfg.student.restrict_vocab),
        teachers=(),
        data=dataclasses.replace(cfg.data, batch_size=p.batch_size or cfg.data.batch_size),
        optim=OptimConfig(lr=p.lr),
        schedule=ScheduleConfig(total_steps=p.max_steps, warmup_steps=min(p.warmup_steps, p.max_steps)),
        parallel=cfg.parallel,
        checkpoint=CheckpointConfig(every=max(p.max_steps // 2, 1)),
        eval=EvalConfig(every=None, max_batches=cfg.eval.max_batches, batch_size=cfg.eval.batch_size),
        log=LogConfig(progress=cfg.log.progress),
    )


def teacher_source(cfg: TrainConfig, i: int, dist):
    """Teacher i's model: its configured name/path/mapping, or its cached pre-trained `final/`
    (pre-trained first if missing: collective under torchrun)."""
    t = cfg.teachers[i]
    if t.pretrain is None:
        return t.model
    pcfg = pretrain_config(cfg, i)
    final = Path(pcfg.output_dir) / "final"
    with cache_lock(Path(pcfg.output_dir + ".lock"), f"teacher {t.name!r}", enabled=dist.is_main):
        dist.barrier()  # the other ranks wait while rank 0 waits for the lock
        if not (final / "config.json").exists():
            if dist.is_main:
                print(f"pre-training teacher {t.name!r} ({t.pretrain.max_steps} steps, CE) into "
                      f"{pcfg.output_dir}", flush=True)
            train(pcfg, dist=dist, label=f"pretrain {t.name}")
    return str(final)


# -------------------------------------------------------------------------------------------------
# models

def _model_width(source, tok) -> int:
    if isinstance(source, str):
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(source).vocab_size)
    return tok.vocab_size


def sample_max_chars(cfg: TrainConfig) -> int:
    """Long texts are read in pieces of at most this many characters (`data.read_samples`)."""
    return 4 * cfg.data.max_length


def uses_bf16(cfg: TrainConfig, dist) -> bool:
    """bf16 parameters in forward passes (`parallel.mixed_precision`; 'auto': on CUDA)."""
    return cfg.parallel.mixed_precision == "bf16" or (cfg.parallel.mixed_precision == "auto"
                                                      and dist.device.type == "cuda")


def build_side(source, tok, remap, *, seed: int, dist, cfg: TrainConfig, trainable: bool, offload: bool = False,
               shard: bool = True):
    """One model: built (`source` a mapping) or loaded, restricted to `remap`'s rows, sharded
    (`shard=False`: returned unsharded, on the CPU, in float32, as built)."""
    if isinstance(source, str):
        model = models.build_causal_lm(source, vocab_size=tok.vocab_size, seed=seed)
        if remap is not None:
            models.restrict_rows(model, remap.used_ids)
    else:
        width = remap.size if remap is not None else tok.vocab_size
        model = models.build_causal_lm(source, vocab_size=width, seed=seed)
    if not trainable:
        models.freeze(model)
    if not shard:
        return model
    models.shard_model(model, mixed_precision=uses_bf16(cfg, dist), cpu_offload=offload,
                       activation_checkpointing=trainable and cfg.student.activation_checkpointing)
    return model


# -------------------------------------------------------------------------------------------------
# the run

def _source_text(src) -> str:
    """A model source as recorded in checkpoints: the path, or the mapping as canonical JSON."""
    return src if isinstance(src, str) else json.dumps(src, sort_keys=True)


def _learned_loss_fn(lp):
    """The §5 loss function of a teacher whose projection W is trained (`LearnedProjection`)."""
    def fn(s, o, b, *, normalizer=None, teacher_index=0, projection=None, **opts):
        return learned_pkl_loss(s, o, b, projection=lp, normalizer=normalizer, teacher_index=teacher_index, **opts)
    return fn


def _rng_state() -> dict:
    """This process's RNG states as plain values and tensors (the checkpoint loads them with
    `weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


def _check_resume(cfg: TrainConfig, out: Path) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return
    changed = resume_changes(read_yaml(saved_path), cfg.to_dict())
    if changed:
        raise TrainConfigError(
            f"resume=true: {', '.join(changed)} differ from the run in {out} (a resume may change only max_steps and "
            "the log/eval/checkpoint keys); start a new output_dir to change them")


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _open_teacher_caches(cfg: TrainConfig, sides: Sides, data_files: dict) -> list:
    """Each teacher's `TeacherCache` (None: run online), checked against the run before any model
    is built: the same teacher identity, tokenizer and documents (`teacher_cache.collate.check_cache`),
    the configured `top_k` if any, and a positions budget at least the run's teacher budget (a smaller
    one would cut the run's samples shorter than configured)."""
    from xtoken_loss.trainer.teacher_cache import open_cache
    from xtoken_loss.trainer.teacher_cache.collate import check_cache
    from xtoken_loss.trainer.teacher_cache.writer import teacher_budget

    out = []
    for i, (t, tok) in enumerate(zip(cfg.teachers, sides.teachers)):
        if t.cache is None:
            out.append(None)
            continue
        cache = open_cache(t.cache)  # errors name the cache's files
        where = f"teachers.{i}.cache: {t.cache}"
        if t.top_k is not None and t.top_k != cache.k:
            raise TrainConfigError(f"{where} holds the top {cache.k} log-probabilities per position, but "
                                   f"teachers.{i}.top_k is {t.top_k}; remove top_k or rebuild the cache with "
                                   f"--top-k {t.top_k}")
        budget = teacher_budget(cfg, i)
        if cache.positions_budget < budget:
            key = "data.max_length" if t.same_vocab else "data.teacher_max_length"
            raise TrainConfigError(f"{where} holds {cache.positions_budget} positions per document, fewer than "
                                   f"this run's teacher budget {budget} ({key}); rebuild the cache with this "
                                   f"config or lower {key}")
        check_cache(cache, cfg, i, tokenizer_fingerprint=tok.fingerprint, data=data_files)
        out.append(cache)
    return out


def _check_batch_split(cfg: TrainConfig, dist) -> int:
    """This rank's microbatch size; the global batch must split evenly over ranks and microbatches."""
    per_rank, rem = divmod(cfg.data.batch_size, dist.world_size)
    if rem:
        raise TrainConfigError(f"data.batch_size={cfg.data.batch_size} does not divide over {dist.world_size} "
                               "ranks; give a multiple of the process count")
    micro = cfg.data.microbatch_size or per_rank
    if per_rank % micro:
        raise TrainConfigError(f"data.microbatch_size={micro} does not divide the {per_rank} sequences each of the "
                               f"{dist.world_size} rank(s) gets per step (data.batch_size={cfg.data.batch_size})")
    return micro


def _build_remaps(cfg: TrainConfig, sides: Sides, dist, max_chars: int) -> dict:
    """Tokenizer fingerprint -> `VocabRemap` of every side (empty without `restrict_vocab`)."""
    remaps: dict = {}
    if not cfg.student.restrict_vocab:
        return remaps
    files = [cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else [])
    # split long texts exactly as the run reads them: pieces tokenize differently at their edges
    opts = dict(max_chars=max_chars, cache_dir=cache_root() / "remaps")
    for tok in [sides.student] + sides.teachers:
        if tok.fingerprint not in remaps:
            if dist.is_main:
                build_remap(tok, files, **opts)
            dist.barrier()
            remaps[tok.fingerprint] = build_remap(tok, files, **opts)
    return remaps


@dataclass
class KDParts:
    """The combined KD loss and what comes with it."""

    loss: MultiTeacherLoss | None  # the training loss (no projection-accuracy pass: a diagnostic)
    eval_loss: MultiTeacherLoss | None  # the same, reporting projection accuracy when configured
    learned: dict  # teacher name -> LearnedProjection (trained)
    projections: list[dict]  # what each projection teacher used (recorded in checkpoints)


def _build_kd_loss(cfg: TrainConfig, sides: Sides, remaps: dict, dist) -> KDParts:
    """The teachers' specs (projections built or loaded, then remapped) and the multi-teacher loss;
    its errors come before any model is loaded."""
    s_remap = remaps.get(sides.student.fingerprint)
    specs, learned, record = [], {}, []
    for i, (t, tok) in enumerate(zip(cfg.teachers, sides.teachers)):
        remap = remaps.get(tok.fingerprint)
        projection = None
        if t.projection is not None:
            path = Path(t.projection) if t.projection != "auto" else auto_projection(
                sides.student, tok, _model_width(t.model, tok), dist)
            projection = load_projection(path, student_fingerprint=sides.student.fingerprint,
                                         teacher_fingerprint=tok.fingerprint)
            record.append({"teacher": t.name, "path": str(path),
                           "tensors_sha256": (projection.metadata or {}).get("tensors_sha256")})
            if s_remap is not None or remap is not None:
                projection = remap_projection(projection, s_remap, remap)
        spec_kwargs = dict(name=t.name, loss=t.loss, weight=t.weight, projection=projection,
                           fingerprint=remap.fingerprint if remap is not None else tok.fingerprint,
                           loss_options=dict(t.loss_options))
        if t.projection_trainable:
            learned[t.name] = LearnedProjection(projection).to(dist.device)
            spec_kwargs["loss_fn"] = _learned_loss_fn(learned[t.name])
        specs.append(at_key(f"teachers.{i}", lambda: TeacherSpec(**spec_kwargs)))
    s_fp = s_remap.fingerprint if s_remap is not None else sides.student.fingerprint
    if not specs:
        return KDParts(None, None, learned, record)
    mt = cfg.loss.multi_teacher
    # projection accuracy costs a pass over every chunk start: measured on held-out batches only
    loss = at_key("loss.multi_teacher", lambda: MultiTeacherLoss(
        specs, dataclasses.replace(mt, projection_accuracy=False), student_fingerprint=s_fp))
    eval_loss = MultiTeacherLoss(specs, mt, student_fingerprint=s_fp) if mt.projection_accuracy else loss
    return KDParts(loss, eval_loss, learned, record)


def _build_optimizer(cfg: TrainConfig, student, extra_params):
    o = cfg.optim
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    if extra_params:
        groups.append({"params": extra_params, "lr": o.projection_lr or o.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=cfg.schedule.total_steps,
                                warmup_steps=cfg.schedule.warmup_steps, min_lr_ratio=cfg.schedule.min_lr_ratio)
    return optimizer, scheduler


def train(cfg: TrainConfig, *, dist=None, label: str = "train") -> RunSummary:
    """Run `cfg` (module doc). Collective under torchrun: every rank calls it."""
    use_cpu_huge_pages()
    sides: Sides = preflight(cfg)
    if dist is None:
        dist = init_distributed(cfg.parallel.device)
    micro = _check_batch_split(cfg, dist)
    out = Path(cfg.output_dir)
    latest = ckpt.latest_checkpoint(out) if cfg.resume else None
    if latest is not None:
        _check_resume(cfg, out)
    max_chars = sample_max_chars(cfg)
    remaps = _build_remaps(cfg, sides, dist, max_chars)
    s_remap = remaps.get(sides.student.fingerprint)
    kd = _build_kd_loss(cfg, sides, remaps, dist)

    samples, lines = data_mod.read_samples(cfg.data.train, max_chars=max_chars, with_lines=True)
    eval_samples, eval_lines = (data_mod.read_samples(cfg.data.eval, max_chars=max_chars, with_lines=True)
                                if cfg.data.eval else ([], []))
    data_files = {"train": (cfg.data.train, samples, lines)}
    if cfg.data.eval:
        data_files["eval"] = (cfg.data.eval, eval_samples, eval_lines)
    caches = _open_teacher_caches(cfg, sides, data_files)

    # models (teachers pre-trained first where configured; a cached teacher has no model)
    sources = [None if caches[i] is not None else teacher_source(cfg, i, dist) for i in range(len(cfg.teachers))]
    student = build_side(cfg.student.model, sides.student, s_remap, seed=cfg.seed, dist=dist, cfg=cfg, trainable=True)
    runtimes = []
    for i, (t, tok, src) in enumerate(zip(cfg.teachers, sides.teachers, sources)):
        if caches[i] is not None:
            runtimes.append(TeacherRuntime(t.name, i, t.loss, t.same_vocab, None, dict(t.loss_options),
                                           top_k=caches[i].k, top_k_dtype=caches[i].dtype))
            continue
        model = build_side(src, tok, remaps.get(tok.fingerprint), seed=cfg.seed, dist=dist, cfg=cfg,
                           trainable=False, offload=t.offload)
        runtimes.append(TeacherRuntime(t.name, i, t.loss, t.same_vocab, model, dict(t.loss_options), top_k=t.top_k,
                                       top_k_dtype=getattr(torch, t.top_k_dtype)))
    extra_params = [p for lp in kd.learned.values() for p in lp.parameters()]
    optimizer, scheduler = _build_optimizer(cfg, student, extra_params)
    model_parts = {"student": student, **{f"projection_{k}": v for k, v in kd.learned.items()}}
    record = {"teachers": [{"name": t.name, "tokenizer": tok.fingerprint, "model": _source_text(src)} if c is None
                           else {"name": t.name, "tokenizer": tok.fingerprint, "cache": str(c.path),
                                 "weights_sha256": c.info["teacher"].get("weights_sha256"),
                                 "settings_sha256": c.info.get("settings_sha256")}
                           for t, tok, src, c in zip(cfg.teachers, sides.teachers, sources, caches)],
              "projections": kd.projections}
    runner = StepRunner(student=student, teachers=runtimes, kd_loss=kd.loss, kd_weight=cfg.loss.kd_weight,
                        ce_weight=cfg.loss.ce_weight, optimizer=optimizer, scheduler=scheduler,
                        grad_clip=cfg.optim.grad_clip, max_bad_steps=cfg.optim.max_bad_steps, dist=dist,
                        extra_params=extra_params)

    start = 0
    if latest is not None:
        extra = ckpt.load_checkpoint(latest, model=model_parts, optimizer=optimizer, dist=dist)
        if extra.get("record") != record:
            raise TrainConfigError(f"resume=true: the teachers or projections differ from those of the checkpoint "
                                   f"{latest} (tokenizer, model or projection files changed); start a new output_dir")
        scheduler.load_state_dict(extra["scheduler"])
        runner.bad_in_a_row, runner.skipped_total = extra["bad_in_a_row"], extra["skipped_total"]
        start = int(extra["step"])
        _set_rng_state(extra["rng"])

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("created by xtoken-train\n")
        (out / "config.yaml").write_text(to_yaml(cfg))
    dist.barrier()

    # data
    t_remaps = [None if t.same_vocab else remaps.get(tok.fingerprint) for t, tok in zip(cfg.teachers, sides.teachers)]
    from xtoken_loss.trainer.teacher_cache.collate import CachedTeacher

    cached = [None if c is None else CachedTeacher(c.path, remap=remaps.get(tok.fingerprint))
              for c, tok in zip(caches, sides.teachers)]
    collate = data_mod.TrainCollate(sides.student, sides.teachers, max_length=cfg.data.max_length,
                                    teacher_max_length=cfg.data.teacher_max_length, train_on=cfg.data.train_on,
                                    student_remap=s_remap, teacher_remaps=t_remaps, teacher_caches=cached)
    eval_list = list(data_mod.eval_batches(eval_samples, collate, cfg.eval.batch_size)) if cfg.data.eval else []
    plan = data_mod.GlobalBatchPlan(data_mod.sample_lengths(samples), cfg.data.batch_size, cfg.seed,
                                    bucket_batches=cfg.data.bucket_batches)
    loader = data_mod.make_train_loader(samples, plan, collate, start_step=start, rank=dist.rank,
                                        world_size=dist.world_size, microbatch_size=micro,
                                        num_workers=cfg.data.num_workers)

    log = MetricsLog(out, enabled=dist.is_main, start_step=start)

    def ev(step: int, first: bool = False) -> dict:
        m = evaluate(student, runtimes, kd.eval_loss, eval_list, dist, max_batches=cfg.eval.max_batches,
                     with_teacher_bpb=first)
        log.write({"step": step, **m})
        return m

    first_eval = ev(0, first=True) if eval_list and start == 0 else _first_eval(out)
    progress = Progress(total=cfg.max_steps, start=start, enabled=dist.is_main and cfg.log.progress, label=label)
    step = start
    try:
        batches = iter(loader)
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            microbatches = [_to_device(mb, dist.device) for mb in next(batches)]
            data_s = time.perf_counter() - t0
            step += 1
            metrics = runner.run(microbatches).metrics
            step_s = time.perf_counter() - t0
            m = {"step": step, **metrics, "time/data": data_s, "time/step": step_s,
                 **_throughput(microbatches, step_s, dist), "world_size": dist.world_size}
            if step % cfg.log.every == 0 or step == cfg.max_steps:
                log.write(m)
            progress.update(step, f"loss {m['loss']:.3f} {m['tokens_per_s']:.0f} tok/s")
            if eval_list and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.max_steps:
                ev(step)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.max_steps:
                ckpt.save_checkpoint(out, step, model=model_parts, optimizer=optimizer, keep=cfg.checkpoint.keep,
                                     dist=dist, extra={
                                         "step": step, "sample_position": step * cfg.data.batch_size,
                                         "scheduler": scheduler.state_dict(), "bad_in_a_row": runner.bad_in_a_row,
                                         "skipped_total": runner.skipped_total, "rng": _rng_state(),
                                         "record": record, "world_size": dist.world_size})
    finally:
        progress.close()
    last_eval = ev(step, first=first_eval is None) if eval_list else None
    export_hf(student, out / "final", tokenizer_source=sides.student.source,
              used_ids=None if s_remap is None else s_remap.used_ids,
              full_vocab_size=None if s_remap is None else sides.student.vocab_size, dist=dist)
    if dist.is_main:
        for name, lp in kd.learned.items():
            lp.save(out / f"projection-{name}", overwrite=True)
    return RunSummary(out, step, first_eval, last_eval, [t.name for t in cfg.teachers])


def _first_eval(out: Path) -> dict | None:
    """The step-0 evaluation a resumed run wrote when it started (for the summary), if any."""
    if not (out / METRICS_FILE).exists():
        return None
    return next((r for r in read_metrics(out) if r.get("step") == 0 and "eval/bpb" in r), None)


def _throughput(microbatches: list[dict], seconds: float, dist) -> dict:
    """Global tokens and text bytes per second of a step."""
    tokens = sum(float(mb["token_mask"].sum()) for mb in microbatches)
    nbytes = sum(float(mb["num_bytes"][mb["sample_mask"].bool()].sum()) for mb in microbatches)
    t, b = dist.all_reduce_sum(torch.tensor([tokens, nbytes], dtype=torch.float64, device=dist.device)).tolist()
    return {"tokens_per_s": t / seconds, "bytes_per_s": b / seconds}


def summary_table(s: RunSummary) -> str:
    """Held-out bits per byte of the student (start -> end) and of each teacher."""
    lines = [f"held-out bits per byte ({s.output_dir}, step {s.steps}):"]
    first, last = s.first_eval or {}, s.last_eval or {}
    if "eval/bpb" in last:
        start = f"{first['eval/bpb']:.3f} -> " if "eval/bpb" in first else ""
        lines.append(f"  student            {start}{last['eval/bpb']:.3f}")
    src = first if any(k.endswith("/bpb") and "teacher" in k for k in first) else last
    for j, name in enumerate(s.teacher_names):
        v = src.get(f"eval/teacher_{j}/bpb")
        if v is not None:
            lines.append(f"  teacher {name:<10} {v:.3f}")
    return "\n".join(lines)


