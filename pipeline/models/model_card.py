"""Markdown from the real figures: the model card of models/export and the README results tables.

Nothing here is typed by hand: every number comes from models/report/metrics.json (evaluate),
the export's parity/quantisation figures and the student checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats with 4 decimals, None as n/a."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def audio_table(audio: Mapping[str, Any]) -> str:
    """Cosine to the teacher on validation tracks, raw and centred, beside the mean baseline."""
    if audio.get("skipped"):
        return f"Audio student skipped: {audio.get('reason', '')}."
    rows = []
    for level in ("segment", "track"):
        block = audio[level]
        for kind, base in (("cosine", "baseline_cosine"), ("centred", "baseline_centred")):
            s, b = block[kind], block[base]
            rows.append([f"{level} {'cosine' if kind == 'cosine' else 'centred cosine'}",
                         s["mean"], s["p10"], s["p50"], s["p90"], b])
    intro = (f"Validation split: {audio['n_val_tracks']} tracks, {audio['n_val_segments']} segments "
             "(artists unseen in training). Centred = both sides minus the mean training teacher "
             "embedding; the mean-embedding baseline scores exactly 0 there.")
    return intro + "\n\n" + markdown_table(["audio student vs teacher", "mean", "p10", "p50", "p90", "mean baseline"], rows)


def same_space_table(same: Mapping[str, Any]) -> str:
    """The verdict and its figures (evaluate's `same_space` section, or `student-clap compare`'s)."""
    if not same:
        return "No same-space figures in this report (re-run `dvc repro evaluate`)."
    if same.get("skipped"):
        return f"Same-space figures skipped: {same.get('reason', '')}."
    a = same["audio_student"]
    verdict = "**yes**" if same["same_space"] else "**no**"
    bar = (f"median track cosine >= {_f(same.get('min_median_cosine'), 2)}, top-5 neighbour overlap >= "
           f"{_f(same.get('min_top5_overlap'), 2)}")
    if same.get("min_median_centred_cosine") is not None:
        bar += f" and median centred track cosine >= {_f(same['min_median_centred_cosine'], 2)}"
    lines = [f"Same space as the teacher: {verdict} (bar: {bar}, on {a['n_tracks']} tracks"
             + (f"; failed: {same['failed']}" if same.get("failed") else "") + ")."]
    # mean_baseline: a student that outputs the mean embedding for every song
    rows = [[label, *(a[key][q] for q in ("mean", "median", "p05", "min"))]
            for key, label in (("track_cosine", "track cosine"), ("track_cosine_centred", "track cosine, centred"),
                               ("mean_baseline", "mean embedding (baseline)")) if key in a]
    lines.append(markdown_table(["audio student vs teacher", "mean", "median", "p05", "min"], rows))
    nb_rows = [[f"top-5 neighbour overlap (k={a.get('top5_k')})", a.get("top5_overlap")],
               [f"top-10 neighbour overlap (k={a.get('top10_k')})", a.get("top10_overlap")],
               ["Spearman of the neighbour ranking", a.get("neighbour_spearman")]]
    e2e = same.get("end_to_end")
    if e2e:
        nb_rows += [[f"end to end: text-query top-{e2e['k']} result overlap ({e2e['n_queries']} prompts)",
                     e2e["text_query_overlap"]],
                    [f"end to end: text-query top-{e2e['k']} result overlap, centred", e2e.get("text_query_overlap_centred")]]
    lines.append(markdown_table(["neighbours (each track's nearest other tracks, student vs teacher)", "value"], nb_rows))
    if a.get("note"):
        lines.append(f"{a['note']}.")
    return "\n\n".join(lines)


def retrieval_table(retrieval: Mapping[str, Any]) -> str:
    if retrieval.get("skipped"):
        return f"Retrieval agreement skipped: {retrieval.get('reason', '')}."
    names = {"audio_student": "audio student (teacher text)", "text_student": "text student (teacher audio)",
             "end_to_end": "text student + audio student"}
    rows = [[names[c] + suffix, r[c]["top_k_overlap"], r[c]["spearman"], r[c]["recall_at_k"]]
            for r, suffix in ((retrieval, ""), (retrieval.get("centred") or {}, ", centred")) for c in names if c in r]
    k = retrieval["k"]
    intro = (f"Text-to-music ranking of the {retrieval['n_tracks']} validation tracks for "
             f"{retrieval['n_queries']} fixed prompts, compared with the teacher's ranking. "
             "Centred: the queries minus the teacher's mean text embedding, so only what tells the "
             "prompts apart decides the ranking.")
    note = f"\n\n{retrieval['note']}." if retrieval.get("note") else ""
    table = markdown_table(["ranking by", f"top-{k} overlap", "Spearman", f"recall@{k} (teacher's best)"], rows)
    return intro + "\n\n" + table + note


def text_table(text: Mapping[str, Any]) -> str:
    if text.get("skipped"):
        return f"Text student skipped: {text.get('reason', '')}."
    rows = [[name, v["n"], v["cosine"], v["centred"], v["baseline_cosine"]]
            for name, v in text.items() if isinstance(v, Mapping)]
    return markdown_table(["held-out query set", "queries", "cosine", "centred cosine", "mean baseline"], rows)


def tags_table(tags: Mapping[str, Any]) -> str:
    if tags.get("skipped"):
        return f"Zero-shot tags skipped: {tags.get('reason', '')}."
    rows = [[cat, v["n_tracks"], v["n_tags"], v["chance"], v["teacher_accuracy"], v.get("student_accuracy"),
             v.get("end_to_end_accuracy"), v.get("agreement_with_teacher")]
            for cat, v in tags.items() if isinstance(v, Mapping)]
    return markdown_table(["category", "tracks", "tags", "chance", "teacher", "audio student", "end to end",
                   "agrees with teacher"], rows)


def teacher_line(teacher: Mapping[str, Any]) -> str:
    """Which teacher the figures are measured against, with its weights' sha256."""
    digests = [f"{what} sha256 `{teacher[key]}`" for what, key in (("checkpoint", "checkpoint_sha256"),
                                                                   ("weights", "weights_sha256"))
               if teacher.get(key)]
    digest = f" ({', '.join(digests)})" if digests else ""
    if teacher.get("kind") == "demo":
        return (f"Measured against **the offline demo teacher**{digest}: a small CLAP trained on synthetic songs. "
                "It knows only their lead instrument, drums, tempo and key, nothing about real music.")
    if teacher.get("kind") == "demo_random":
        return (f"Measured against **a seeded random demo teacher**{digest}: these figures test the pipeline, "
                "not music understanding.")
    if teacher:
        return f"Measured against LAION-CLAP (`{teacher.get('source') or 'checkpoint'}`){digest}."
    return "Measured against the teacher."


def model_index(metrics: Mapping[str, Any], name: str = "student-clap") -> dict[str, Any]:
    """Hugging Face `model-index` metadata with the same-space figures (empty when there are none)."""
    same = metrics.get("same_space") or {}
    if not same or same.get("skipped"):
        return {}
    a = same["audio_student"]
    teacher = metrics.get("teacher") or {}
    who = "the offline demo teacher" if str(teacher.get("kind", "")).startswith("demo") else "LAION-CLAP"
    figures = [
        ("median_track_cosine", "Median track cosine to the teacher", a["track_cosine"]["median"]),
        ("mean_track_cosine", "Mean track cosine to the teacher", a["track_cosine"]["mean"]),
        ("p05_track_cosine", "5th-percentile track cosine to the teacher", a["track_cosine"]["p05"]),
        ("min_track_cosine", "Minimum track cosine to the teacher", a["track_cosine"]["min"]),
        ("median_track_cosine_centred", "Median centred track cosine to the teacher",
         (a.get("track_cosine_centred") or {}).get("median")),
        ("top5_neighbour_overlap", f"Top-5 neighbour overlap (k={a.get('top5_k')})", a.get("top5_overlap")),
        ("top10_neighbour_overlap", f"Top-10 neighbour overlap (k={a.get('top10_k')})", a.get("top10_overlap")),
        ("neighbour_spearman", "Spearman of the neighbour ranking", a.get("neighbour_spearman")),
    ]
    e2e = same.get("end_to_end") or {}
    if e2e:
        figures.append(("text_query_overlap", f"End-to-end text-query top-{e2e['k']} result overlap",
                        e2e.get("text_query_overlap")))
    return {"model-index": [{
        "name": name,
        "results": [{
            "task": {"type": "feature-extraction", "name": f"Same-space fidelity to {who}"},
            "dataset": {"type": "student-clap-validation",
                        "name": f"Validation tracks, artists unseen in training ({a['n_tracks']} tracks)"},
            "metrics": [{"type": t, "name": n, "value": round(float(v), 6)} for t, n, v in figures if v is not None],
        }],
    }]}


def front_matter(metrics: Mapping[str, Any]) -> str:
    """The YAML header Hugging Face reads from a model card (tags, and model-index when measured)."""
    import yaml

    meta: dict[str, Any] = {"library_name": "onnx", "tags": ["audio", "music", "clap", "distillation", "onnx"]}
    meta.update(model_index(metrics))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def results_markdown(metrics: Mapping[str, Any]) -> str:
    """All result tables; used by the model card and by `student-clap results --readme`."""
    if not metrics:
        return "No evaluation report yet (run `dvc repro evaluate`)."
    parts = [teacher_line(metrics.get("teacher") or {}),
             "**Same space?**", same_space_table(metrics.get("same_space") or {}),
             "**Audio**", audio_table(metrics.get("audio", {"skipped": True, "reason": "not evaluated"})),
             "**Text-to-music retrieval agreement**", retrieval_table(metrics.get("retrieval", {"skipped": True})),
             "**Text student**", text_table(metrics.get("text", {"skipped": True})),
             "**Zero-shot tags**", tags_table(metrics.get("tags", {"skipped": True}))]
    notes = metrics.get("notes") or []
    if notes:
        parts.append("Notes: " + "; ".join(notes) + ".")
    return "\n\n".join(parts)


def licence_markdown(licences: Mapping[str, Any], licence_files: list[str]) -> str:
    """Licence section from models/report/licences.json (the audit and the training split)."""
    parts = []
    audit = licences.get("audit")
    if audit:
        verdict = "passed" if audit.get("ok") and not audit.get("violations") else "FAILED"
        parts.append(f"Licence audit — every track in the mel and teacher caches is in the manifest with a "
                     f"licence the policy allows: **{verdict}** ({audit.get('tracks')} tracks, "
                     f"{_f(audit.get('minutes'), 1)} minutes).")
        rows = [[src, lic, v["tracks"], f"{v['minutes']:.1f}"]
                for src, s in (audit.get("sources") or {}).items() for lic, v in s.get("licenses", {}).items()]
        if rows:
            parts.append(markdown_table(["source", "licence", "tracks", "minutes"], rows))
        for v in (audit.get("violations") or [])[:20]:
            parts.append(f"- violation: `{v.get('track_id')}` in {v.get('cache')}: {v.get('problem')}")
    else:
        parts.append("No licence audit was recorded.")
    training = licences.get("training", {}).get("by_license", {})
    if training:
        rows = [[lic, v["tracks"], f"{v['minutes']:.1f}"] for lic, v in training.items()]
        parts += ["Of these, the students trained on (train split):", markdown_table(["licence", "tracks", "minutes"], rows)]
    if licence_files:
        parts.append("Attribution of every source song: " + ", ".join(f"[{f}]({f})" for f in licence_files) + ".")
    return "\n\n".join(parts)


def _params_block(params: Mapping[str, Mapping[str, Any]], students: Mapping[str, Any]) -> str:
    lines = []
    for name, section in params.items():
        lines.append(f"- `{name}`: " + ", ".join(f"{k}={v}" for k, v in section.items()))
    for name, blob in students.items():
        cfg = blob.get("config") or {}
        if cfg:
            lines.append(f"- {name} student: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return "\n".join(lines)


def describe_teacher(teacher: Mapping[str, Any]) -> str:
    """What the students were distilled from, honest about the offline demo teacher."""
    common = ("They map audio and text into the teacher's 512-d embedding space, so the cosine between "
              "an audio and a text embedding ranks songs for a text query. They run with onnxruntime alone.")
    if teacher.get("kind") == "demo":
        return ("Small students distilled from the **offline demo teacher**: a small CLAP model trained on "
                "synthesised songs that stands in for LAION-CLAP so the pipeline runs without downloads. It "
                "knows only the synthetic attributes (lead instrument among eight, drums or none, slow or "
                "fast, major or minor), so these files show the pipeline and the distillation work, not "
                "real music understanding. " + common)
    if teacher.get("kind") == "demo_random":
        return ("Small students distilled from a **seeded random demo teacher** that stands in for LAION-CLAP "
                "in tests. Their figures say nothing about music understanding. " + common)
    source = teacher.get("source") or "music_audioset_epoch_15_esc_90.14.pt"
    return (f"Small students distilled from the LAION-CLAP music model (`{source}`: HTSAT-base audio and "
            "RoBERTa text towers). " + common)


FILE_DESCRIPTIONS = {
    "audio_student.onnx": "waveform segments -> embedding, embedding_raw",
    "audio_student_mel.onnx": "student log-mels -> embedding, embedding_raw",
    "audio_student.int8.onnx": "waveform model, projection head int8 (dynamic)",
    "audio_student_frontend.onnx": "song level: waveform (any length) -> student log-mel",
    "audio_student_trunk.onnx": "song level: log-mel (any length) -> feature map of the local blocks",
    "audio_student_head.onnx": "song level: one window's feature map -> embedding, embedding_raw",
    "audio_student_head.int8.onnx": "head, static int8 pointwise convolutions (calibrated on training mels)",
    "text_student.onnx": "input_ids, attention_mask -> embedding",
}


def _file_rows(parity: Mapping[str, Any], file_sizes: Mapping[str, int]) -> list[list[str]]:
    """One row per exported ONNX file: what it does, its size and its check against PyTorch."""
    rows = []
    for fname, what in FILE_DESCRIPTIONS.items():
        if fname in file_sizes:
            par = parity.get(fname, {})
            check = (f"cosine {par['min_cosine']:.6f} min, max abs diff {par['max_abs_diff']:.1e}"
                     if "min_cosine" in par else
                     f"cosine to fp32 {par.get('cosine_min', float('nan')):.6f} min, {par.get('cosine_mean', float('nan')):.6f} mean"
                     if par else "")
            rows.append([f"`{fname}`", what, f"{file_sizes[fname] / 1e6:.2f} MB", check])
    return rows


def _input_lines(audio: Mapping[str, Any] | None, text: Mapping[str, Any] | None) -> list[str]:
    """The input conventions of the exported students, one bullet each."""
    inputs = []
    if audio:
        inputs.append(
            f"- Audio: mono float32 waveform in [-1, 1] at **{audio['sample_rate']} Hz**, segments of "
            f"{audio['segment_seconds']:g} s (**{audio['segment_samples']} samples**), dynamic batch. "
            f"A song is cut into {audio['segment_seconds']:g}-s windows every {audio['hop_seconds']:g} s "
            "(short songs repeat-padded, a tail window only when it covers new audio); the song vector is "
            "the L2-normalised mean of the segments' `embedding_raw`. The mel variant takes "
            f"[batch, {audio['mel_shape'][0]}, frames] EfficientAT log-mels."
        )
        song = audio.get("song")
        if song:
            fid = song.get("fidelity", {})
            figures = ", ".join(f"{k} {v:.6f}" for k, v in fid.items() if isinstance(v, float))
            inputs.append(
                "- Song level (`student-clap embed/index` by default): the front-end and the trunk run once over "
                f"runs of consecutive windows, each window takes {song['window_columns']} feature-map columns every "
                f"{song['hop_columns']}, the head runs per window. Measured against the segment-wise fp32 model (synthetic_song: a 60-s "
                f"test song of tones, chirps, noise and near-silence; segment_/track_: held-out validation mels): {figures}."
            )
    if text:
        inputs.append(f"- Text: `tokenizer.json` (byte-level BPE), at most {text['max_length']} tokens; "
                      "int64 `input_ids` and `attention_mask` [batch, length].")
    return inputs


def render(
    *,
    spec: Mapping[str, Any],
    metrics: Mapping[str, Any],
    students: Mapping[str, Any],
    licences: Mapping[str, Any],
    licence_files: list[str],
    params: Mapping[str, Mapping[str, Any]],
    file_sizes: Mapping[str, int],
) -> str:
    """models/export/README.md."""
    audio, text, parity = spec.get("audio"), spec.get("text"), spec.get("parity", {})
    out = [front_matter(metrics), "# Student CLAP — exported students", describe_teacher(metrics.get("teacher") or {})]
    teacher = spec.get("teacher") or {}
    if teacher.get("demo"):
        out.append(f"**Demo teacher (teacher.model.source {teacher.get('kind')}).** These are not students of "
                   "LAION-CLAP and are not for real music libraries.")
    if spec.get("model_identity"):
        out.append("Model identity (in `student_clap.json`, every ONNX file's metadata and every library index "
                   f"built with these files; an index of another identity is refused):\n\n    {spec['model_identity']}")
    for name, reason in (spec.get("skipped") or {}).items():
        out.append(f"**The {name} student is not included:** {reason}.")

    rows = _file_rows(parity, file_sizes)
    out += ["## Files", markdown_table(["file", "what", "size", "check against PyTorch"], rows),
            "Also: `tokenizer.json` (text student), `student_clap.json` (inputs, read by `student-clap embed/search`), "
            "`licenses/` (attribution), `SHA256SUMS` (verify with `sha256sum -c SHA256SUMS`)."]

    inputs = _input_lines(audio, text)
    out += ["## Inputs", "\n".join(inputs) or "(no student exported)"]

    out += ["## Quality against the teacher", results_markdown(metrics)]
    out += ["## Parameters", _params_block(params, students)]
    out += ["## Licences of the training data", licence_markdown(licences, licence_files)]
    out += [
        "## Intended use and limits",
        "- For text-to-music search, similar-song lookup and tagging on modest hardware (CPU, "
        "Raspberry-Pi class), where running the full CLAP model is too slow.\n"
        "- The students imitate the teacher; they inherit its biases and its blind spots and add their "
        "own error (see the figures above). Judge them by the centred figures: raw cosine is inflated "
        "by the direction all embeddings share.\n"
        "- Trained only on the songs listed in the attribution files: music far from that material "
        "(speech, field recordings, genres absent from the data) is embedded less faithfully.\n"
        "- The text student knows the vocabulary of its training queries best; long or unusual "
        "phrasings drift further from the teacher than short tag-like queries.\n"
        "- Embeddings are not calibrated probabilities; compare them only with cosine similarity, "
        "and only with embeddings from the same export.",
    ]
    return "\n\n".join(out) + "\n"
