"""The offline teacher cache (docs/teacher_cache.md): a teacher's top-k outputs over a data file,
written once by `xtoken-train cache-teacher` and read by any student tokenizer's collator.

- `topk_outputs(logits, input_ids, token_mask, k, dtype)`: the top-k form (cache and online path).
- `open_cache(dir) -> TeacherCache`: the reader (random access per document).
- `teacher_cache.collate.CachedTeacher`: teacher i of `trainer.data.TrainCollate` read from a cache.
- `teacher_cache.writer.write_cache` / `cache_teacher`: the build (the CLI calls the latter).
"""

from xtoken_loss.trainer.teacher_cache.format import CachedDocument, TeacherCache, open_cache
from xtoken_loss.trainer.teacher_cache.outputs import topk_outputs

__all__ = ["CachedDocument", "TeacherCache", "open_cache", "topk_outputs"]
