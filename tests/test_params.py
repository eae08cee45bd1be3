from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params
from repo_params import params_tree, repo_params


def test_repo_params_load_and_cover_every_section(repo_root: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    # params.yaml spells out every section, so nothing silently falls back to a code default.
    assert set(raw) == set(Params.__dataclass_fields__)
    assert params.audio.segment_seconds == 10.0
    assert params.frontend.teacher.n_mels == 64 and params.frontend.student.n_mels == 128


def test_unknown_key_names_its_dotted_path() -> None:
    with pytest.raises(ParamsError, match=r"distill_audio\.loss\.kindd"):
        repo_params({"distill_audio": {"loss": {"kindd": "cosine"}}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"distill_audio": {"epochs": "3"}}, "distill_audio.epochs"),
        ({"distill_audio": {"epochs": True}}, "distill_audio.epochs"),
        ({"mels": {"max_failure_ratio": "half"}}, "mels.max_failure_ratio"),
        ({"teacher": {"model": {"source": "hub"}}}, "teacher.model.source"),
        ({"ingest": {"sources": {"fma": {"lists": "a.md"}}}}, "ingest.sources.fma.lists"),
        ({"distillation": {"audio_enabled": "yes"}}, "distillation.audio_enabled"),
    ],
)
def test_wrong_types_are_refused_with_the_field(data: dict, field: str) -> None:
    with pytest.raises(ParamsError, match=field.replace(".", r"\.")):
        repo_params(data)


def test_ints_are_accepted_for_floats() -> None:
    params = repo_params({"distill_audio": {"lr": 1}})
    assert params.distill_audio.lr == 1.0 and isinstance(params.distill_audio.lr, float)


@pytest.mark.parametrize("missing", ["distill_text", "distill_audio.epochs", "ingest.sources.fma.metadata"])
def test_a_missing_key_is_an_error_naming_it_and_params_yaml(missing: str, tmp_path: Path) -> None:
    """There are no defaults in code: a key left out of params.yaml is refused, never filled in."""
    tree = params_tree()
    *parents, last = missing.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[last]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    with pytest.raises(ParamsError, match=rf"params\.yaml: missing key\(s\) {missing.replace('.', r'[.]')}: params\.yaml sets every key"):
        load_params(path)


def test_load_params_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("audio: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml.*not valid YAML"):
        load_params(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("audoi: {}\n")
    with pytest.raises(ParamsError, match=r"typo.yaml.*audoi"):
        load_params(typo)


def test_restricted_view_allows_declared_and_refuses_the_rest() -> None:
    from pipeline.params import restrict

    view = restrict(repo_params(), ["distill_audio", "teacher.batch_size", "frontend.student"], "demo_stage")
    assert view.distill_audio.loss.kind == "cosine"
    assert view.teacher.batch_size == 8
    assert view.frontend.student.n_mels == 128
    with pytest.raises(ParamsError, match=r"'demo_stage' reads params 'teacher\.model'"):
        view.teacher.model
    with pytest.raises(ParamsError, match=r"'distill_text'"):
        view.distill_text
    with pytest.raises(ParamsError, match=r"frontend\.teacher"):
        view.frontend.teacher


def test_every_dvc_stage_declares_params_that_exist(repo_root: Path) -> None:
    from pipeline.params import declared_params

    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    params = load_params(repo_root / "params.yaml")
    for stage in spec["stages"]:
        for dotted in declared_params(repo_root / "dvc.yaml", stage) or []:
            obj = params
            for part in dotted.split("."):
                assert hasattr(obj, part), f"dvc.yaml stage {stage} declares unknown params {dotted}"
                obj = getattr(obj, part)
