"""The CLAP joint space the teacher and both students embed into."""

from student_clap.spec import EMBED_DIM

__all__ = ["EMBED_DIM"]
