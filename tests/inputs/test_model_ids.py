import pickle

import pytest

from rqvae_ray.errors import InvalidModelIdsError, ModelsFileError
from rqvae_ray.inputs.model_ids import (
    DEFAULT_MODELS,
    InvalidModelIdError,
    group_by_dataset,
    parse_model_id,
    parse_model_ids,
    read_models_file,
    split_model_ids,
)
from tests.writing import csv_name

SETTINGS = ("div_weight", "commitment_weight", "lr", "quant_weight", "recon_weight", "use_kl_divergence")


def settings(spec):
    return tuple(getattr(spec, name) for name in SETTINGS)


def test_the_ten_published_ids():
    specs = parse_model_ids(list(DEFAULT_MODELS))
    assert len(specs) == 10
    assert [s.dataset for s in specs] == ["nyc"] * 5 + ["tky"] * 5
    assert {s.dataset_org for s in specs} == {"comp5331poi"}
    assert {s.commitment_weight for s in specs if s.dataset == "nyc"} == {0.5}
    assert {s.commitment_weight for s in specs if s.dataset == "tky"} == {0.25}
    assert sorted({s.div_weight for s in specs}) == [0.0, 0.25, 0.5, 0.75]
    assert {s.lr for s in specs} == {5e-5}
    assert [s.quant_weight for s in specs].count(0.0) == 2
    groups = group_by_dataset(specs)
    assert list(groups) == [("comp5331poi", "nyc"), ("comp5331poi", "tky")]
    assert [len(g) for g in groups.values()] == [5, 5]


def test_fields_of_one_id():
    spec = parse_model_id("comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant")
    assert (spec.org, spec.name, spec.dataset) == (
        "comp5331poi",
        "rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant",
        "nyc",
    )
    assert (spec.div_weight, spec.commitment_weight, spec.lr) == (0.25, 0.5, 5e-5)
    assert (spec.quant_weight, spec.recon_weight, spec.use_kl_divergence) == (0.0, 1.0, False)
    assert csv_name(spec) == "codebooks-rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant.csv"
    assert spec.dataset_repo == "comp5331poi/nyc"


@pytest.mark.parametrize(
    ("suffix", "quant", "recon", "kl"),
    [
        ("-without_L_quant", 0.0, 1.0, False),
        ("-without_L_reconstruction", 1.0, 0.0, False),
        ("-withKL", 1.0, 1.0, True),
        ("-WITHkl", 1.0, 1.0, True),
        ("", 1.0, 1.0, False),
    ],
)
def test_flags(suffix, quant, recon, kl):
    spec = parse_model_id(f"org/rqvae-tky-div0.5-commit0.25-lr1e-3{suffix}")
    assert (spec.quant_weight, spec.recon_weight, spec.use_kl_divergence) == (quant, recon, kl)
    assert spec.lr == 1e-3


def test_defaults_when_fields_absent():
    spec = parse_model_id("org/rqvae-tky")
    assert settings(spec) == (0.25, 0.25, 5e-5, 1.0, 1.0, False)


def test_any_dataset_in_a_published_style_id():
    spec = parse_model_id("comp5331poi/rqvae-ca-div0.25-commit0.5-lr5e-5")
    assert (spec.dataset, spec.dataset_org, spec.dataset_repo) == ("ca", "comp5331poi", "comp5331poi/ca")
    assert settings(spec) == (0.25, 0.5, 5e-5, 1.0, 1.0, False)
    spec = parse_model_id("myorg/rqvae-Gowalla_CA.v2-withKL")
    assert spec.dataset_repo == "myorg/Gowalla_CA.v2", "a new dataset name is kept as written"
    assert spec.use_kl_divergence is True


@pytest.mark.parametrize(
    ("model_id", "dataset"),
    [
        ("org/my_nyc_model", "nyc"),  # old IDs: exactly one nyc/tky token anywhere
        ("org/rqvae-v2-tky-div0.5", "tky"),
        ("org/RQVAE.NYC", "nyc"),
        ("org/rqvae-nyc-tky-div0.25", "nyc"),  # both named: the token after 'rqvae-' decides
        ("org/rqvae-tky-nyc-div0.25", "tky"),
        ("org/rqvae-TKY-nyc", "tky"),
        ("org/rqvae-nyc-tkydims", "nyc"),  # 'tkydims' is not the token 'tky'
    ],
)
def test_dataset_rules_for_nyc_and_tky(model_id, dataset):
    assert parse_model_id(model_id).dataset == dataset


def test_explicit_pairing_with_a_dataset_in_another_org():
    spec = parse_model_id("myorg/poi-tokenizer-v2=theirorg/gowalla-ca")
    assert (spec.model_id, spec.org, spec.name) == ("myorg/poi-tokenizer-v2", "myorg", "poi-tokenizer-v2")
    assert (spec.dataset_org, spec.dataset, spec.dataset_repo) == ("theirorg", "gowalla-ca", "theirorg/gowalla-ca")
    assert csv_name(spec) == "codebooks-poi-tokenizer-v2.csv"
    assert settings(spec) == (None,) * 6, "a name outside the scheme says no training settings"


def test_pairing_overrides_the_dataset_a_scheme_name_says_and_keeps_its_settings():
    spec = parse_model_id(" comp5331poi/rqvae-nyc-div0.5-commit0.5 = mirror/nyc-2024 ")
    assert (spec.model_id, spec.dataset_repo) == ("comp5331poi/rqvae-nyc-div0.5-commit0.5", "mirror/nyc-2024")
    assert (spec.div_weight, spec.commitment_weight, spec.lr) == (0.5, 0.5, 5e-5)
    # A scheme name without a dataset token is usable once paired.
    assert parse_model_id("org/rqvae-div0.75=org/ca").div_weight == 0.75


def test_a_bare_model_name_gets_the_default_org_and_may_be_paired():
    spec = parse_model_id("tokenizer=lab/poi")
    assert (spec.model_id, spec.dataset_repo) == ("comp5331poi/tokenizer", "lab/poi")


def test_group_by_dataset_groups_by_the_dataset_repo():
    specs = parse_model_ids(["a/rqvae-nyc-x", "b/rqvae-nyc-y", "b/m=a/nyc", "a/rqvae-ca-z", "c/n=a/ca"])
    groups = group_by_dataset(specs)
    assert list(groups) == [("a", "nyc"), ("b", "nyc"), ("a", "ca")]
    assert [s.model_id for s in groups["a", "nyc"]] == ["a/rqvae-nyc-x", "b/m"]
    assert [s.model_id for s in groups["a", "ca"]] == ["a/rqvae-ca-z", "c/n"]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("comp5331poi/rqvae-div0.25-commit0.5-lr5e-5", "must say its dataset"),
        ("comp5331poi/rqvae-lr5e-5", "must say its dataset"),
        ("comp5331poi/rqvae-withKL", "must say its dataset"),
        ("comp5331poi/my-nyc-tky-model", "must say its dataset"),
        ("myorg/poi-tokenizer-v2", "does not follow the scheme"),
        ("comp5331poi/rqvae-nyc-div0.2.5-commit0.5", "'div0.2.5' is not a number"),
        ("comp5331poi/rqvae-nyc-div0.25-commitx", "'commitx' is not a number"),
        ("comp5331poi/rqvae-nyc-lr5e-x", "'lr5e-x' is not a number"),
        ("comp5331poi/rqvae-ca-div0.1-div0.2", "'div' appears 2 times"),
        ("a/b/rqvae-nyc", "exactly one '/'"),
        ("a/m=b", "the dataset repo after '=' is 'ORG/DATASET' with exactly one '/'"),
        ("a/m=b/c/d", "the dataset repo after '=' is 'ORG/DATASET' with exactly one '/'"),
        ("a/m=b/c=d/e", "pair a model with one dataset repo"),
    ],
)
def test_invalid_ids(bad, says):
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_id(bad)
    assert says in str(info.value)
    assert str(info.value).startswith(repr(bad) + ": ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "bad", ["comp5331poi/rqvae-div0.25", "myorg/poi-tokenizer-v2", "myorg/my-nyc-tky-model", "poi-tokenizer"]
)
def test_an_unpaired_name_without_a_dataset_shows_how_to_pair_it(bad):
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_id(bad)
    model_id = bad if "/" in bad else f"comp5331poi/{bad}"
    assert f"'{model_id}=ORG/DATASET'" in info.value.reason
    spec = parse_model_id(f"{bad}=someorg/somedata")  # ... and the pairing it shows works
    assert spec.dataset_repo == "someorg/somedata"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("o" * 265 + "/rqvae-nyc", "the organisation is 265 characters long; the Hub allows at most 96"),
        ("org/rqvae-nyc-" + "x" * 90, "the model name is 100 characters long"),
        ("org/m=" + "d" * 97 + "/ca", "the dataset organisation is 97 characters long"),
        ("org/m=org/" + "c" * 97, "the dataset name is 97 characters long"),
        ("org/rqvae-" + "c" * 97 + "-div0.25", "the model name is 111 characters long"),
        ("/rqvae-nyc", "the organisation is empty"),
        ("org/", "the model name is empty"),
        ("org/m=/ca", "the dataset organisation is empty"),
        ("org/m=org/", "the dataset name is empty"),
        ("../rqvae-nyc", "the organisation '..' is a path, not a name"),
        ("org/.", "the model name '.' is a path, not a name"),
        ("org/m=org/..", "the dataset name '..' is a path, not a name"),
        ("org/rqvae nyc", "the model name 'rqvae nyc' may only use letters, digits, '.', '_', '-'"),
        ("org/rqvae-nyc=or g/ca", "the dataset organisation 'or g' may only use letters"),
        ("org/rqvae-nycé", "may only use letters"),
        ("org/..rqvae-nyc", "the model name '..rqvae-nyc' may only start with a letter or digit"),
        ("_org/rqvae-nyc", "the organisation '_org' may only start with a letter or digit"),
        ("org/m=org/-ca", "the dataset name '-ca' may only start with a letter or digit"),
        ("org/rqvae-nyc..x", "may not contain '..' or '--'"),
        ("org/rqvae-nyc--x", "may not contain '..' or '--'"),
        ("org/rqvae-nyc-", "may not end with '.' or '-'"),
        ("comp5331poi/rqvae-nyc-lr5e-", "the model name 'rqvae-nyc-lr5e-' may not end with '.' or '-'"),
        ("comp5331poi/rqvae-", "the model name 'rqvae-' may not end with '.' or '-'"),
        ("org/rqvae-ca.-div0.25", "the dataset name 'ca.' may not end with '.' or '-'"),
        ("org/rqvae-nyc.git", "the model name 'rqvae-nyc.git' may not end with '.git'"),
        ("org/m=org/ca.GIT", "the dataset name 'ca.GIT' may not end with '.git'"),
        ("org/rqvae-ca.git-div0.25", "the dataset name 'ca.git' may not end with '.git'"),
    ],
)
def test_names_that_cannot_be_a_path_component_or_a_hub_name(bad, says):
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_id(bad)
    assert says in str(info.value)
    assert "\n" not in str(info.value)


def test_names_at_the_limits_pass():
    org, name, dataset = "o" * 96, "rqvae-" + "n" * 90, "d" * 96
    spec = parse_model_id(f"{org}/{name}={org}/{dataset}")
    assert (spec.org, spec.name, spec.dataset_repo) == (org, name, f"{org}/{dataset}")
    assert parse_model_id("9org/rqvae-nyc_.x_").name == "rqvae-nyc_.x_"


def test_all_bad_ids_reported_together():
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_ids(["org/rqvae-div0.1", DEFAULT_MODELS[0], "org/rqvae-nyc-div0..1"])
    assert isinstance(info.value, InvalidModelIdsError)
    assert list(info.value.errors) == ["org/rqvae-div0.1", "org/rqvae-nyc-div0..1"]
    assert "rqvae-div0.1" in str(info.value) and "rqvae-nyc-div0..1" in str(info.value)


def test_split_reports_duplicates_once_each_with_their_counts():
    split = split_model_ids(
        [
            DEFAULT_MODELS[0],
            "comp5331poi/rqvae-ca-a",
            DEFAULT_MODELS[0].split("/", 1)[1],  # the same model, by its bare name
            f"{DEFAULT_MODELS[0]}=comp5331poi/nyc",  # ... and paired with the dataset its name says
            "comp5331poi/rqvae-ca-a",
            DEFAULT_MODELS[1],
            "org/rqvae-div0.1",
            "org/rqvae-div0.1",
        ]
    )
    assert [s.model_id for s in split.specs] == [DEFAULT_MODELS[0], "comp5331poi/rqvae-ca-a", DEFAULT_MODELS[1]]
    assert split.duplicates == {DEFAULT_MODELS[0]: 3, "comp5331poi/rqvae-ca-a": 2}
    assert list(split.errors) == ["org/rqvae-div0.1"]
    specs, errors, duplicates = split  # unpacks like a tuple
    assert (specs, errors, duplicates) == (split.specs, split.errors, split.duplicates)


def test_split_without_duplicates_reports_none():
    assert split_model_ids(list(DEFAULT_MODELS)).duplicates == {}


def test_a_model_paired_with_two_dataset_repos_is_an_error_naming_both():
    split = split_model_ids(["org/m=a/nyc", "other/rqvae-ca", "org/m=b/nyc", "org/m=a/nyc"])
    assert [s.model_id for s in split.specs] == ["other/rqvae-ca"]
    assert split.duplicates == {}
    assert list(split.errors) == ["org/m"]
    assert split.errors["org/m"] == "'org/m': paired with 2 dataset repos (a/nyc, b/nyc); pair it with one"
    # The dataset a scheme name says counts as its pairing.
    split = split_model_ids(["org/rqvae-nyc-x", "org/rqvae-nyc-x=mirror/nyc"])
    assert split.specs == [] and "org/nyc, mirror/nyc" in split.errors["org/rqvae-nyc-x"]
    with pytest.raises(InvalidModelIdsError) as info:
        parse_model_ids(["org/m=a/nyc", "org/m=b/nyc"])
    assert info.value.errors == {"org/m": "'org/m': paired with 2 dataset repos (a/nyc, b/nyc); pair it with one"}


def test_read_models_file(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text(
        "\ufeff# my models\n"
        "comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5\n"
        "\n"
        "   myorg/poi-tokenizer-v2 = theirorg/gowalla-ca   # trailing comment\n"
        "  # indented comment\n"
        "rqvae-ca-div0.5\t\n"
        "comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5\n",
        encoding="utf-8",
    )
    entries = read_models_file(path)
    assert entries == [
        "comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5",
        "myorg/poi-tokenizer-v2=theirorg/gowalla-ca",
        "rqvae-ca-div0.5",
        "comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5",
    ]
    split = split_model_ids(entries)
    assert [s.dataset_repo for s in split.specs] == ["comp5331poi/nyc", "theirorg/gowalla-ca", "comp5331poi/ca"]
    assert split.duplicates == {"comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5": 2}


def test_read_models_file_names_every_bad_line_by_number(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# header\norg/rqvae-nyc\nmyorg/poi-tokenizer\n\norg/rqvae-nyc org/rqvae-tky\norg/rqvae-tky\n")
    with pytest.raises(ModelsFileError) as info:
        read_models_file(path)
    error = info.value
    assert error.path == str(path) and error.lines == (3, 5)
    assert str(error).startswith(f"models file {path}: line 3: 'myorg/poi-tokenizer': the name does not follow")
    assert "; line 5: 'org/rqvae-nyc org/rqvae-tky': one MODEL_ID[=ORG/DATASET] per line" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot be read (No such file or directory)"),
        (b"\xff\xfe\x00bad", "is not UTF-8 text"),
        (b"# nothing here\n\n   \n", "holds no model IDs"),
        (b"", "holds no model IDs"),
    ],
)
def test_read_models_file_that_cannot_be_used(tmp_path, content, says):
    path = tmp_path / "models.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelsFileError) as info:
        read_models_file(path)
    assert str(info.value) == f"models file {path}: {info.value.reason}"
    assert says in info.value.reason and info.value.lines == ()


def test_read_models_file_on_a_directory(tmp_path):
    with pytest.raises(ModelsFileError) as info:
        read_models_file(tmp_path)
    assert "cannot be read (Is a directory)" in str(info.value)


def test_models_file_error_survives_pickling():
    error = ModelsFileError("m.txt", "line 2: bad", (2,))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ModelsFileError and str(again) == "models file m.txt: line 2: bad"
    assert (again.path, again.reason, again.lines) == ("m.txt", "line 2: bad", (2,))
