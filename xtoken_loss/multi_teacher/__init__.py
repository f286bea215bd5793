"""Several teachers, same-vocab and cross-tokenizer in any mix: teacher specs (`teachers`), per-teacher
scores (`scores`) and the aggregation modes (`aggregate`). docs/multi_teacher.md has the formulas."""

from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss, multi_teacher_loss
from xtoken_loss.multi_teacher.teachers import TeacherSpec, build_teachers

__all__ = ["MultiTeacherConfig", "MultiTeacherLoss", "TeacherSpec", "build_teachers", "multi_teacher_loss"]
