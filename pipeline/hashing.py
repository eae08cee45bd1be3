"""File digests: the one sha256 helper behind caches, downloads, provenance and checksums (the
runtime's, student_clap.files)."""

from student_clap.files import sha256_file

__all__ = ["sha256_file"]
