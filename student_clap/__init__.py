"""Student CLAP runtime: music embeddings and text-to-music search with the exported ONNX students.

Self-contained and torch-free: decoding (libsndfile, soxr, FFmpeg through PyAV), the log-mel
(numpy + scipy), the query tokenizer, the song-level embedder (onnxruntime), the SQLite library
index, the `StudentClap` API and the `embed`/`index`/`search` commands. The training pipeline
(package `pipeline`) imports from here, never the reverse.
"""

from __future__ import annotations

__all__ = ["StudentClap"]


def __getattr__(name: str):
    if name == "StudentClap":  # lazily: `import student_clap.audio` should not load onnxruntime
        from student_clap.api import StudentClap

        return StudentClap
    raise AttributeError(name)
