import pytest

from rqvae_ray.model_ids import DEFAULT_MODELS, InvalidModelIdError, group_by_dataset, parse_model_id, parse_model_ids


def test_the_ten_published_ids():
    specs = parse_model_ids(list(DEFAULT_MODELS))
    assert len(specs) == 10
    assert [s.dataset for s in specs] == ["nyc"] * 5 + ["tky"] * 5
    assert {s.commitment_weight for s in specs if s.dataset == "nyc"} == {0.5}
    assert {s.commitment_weight for s in specs if s.dataset == "tky"} == {0.25}
    assert sorted({s.div_weight for s in specs}) == [0.0, 0.25, 0.5, 0.75]
    assert {s.lr for s in specs} == {5e-5}
    assert [s.quant_weight for s in specs].count(0.0) == 2
    groups = group_by_dataset(specs)
    assert list(groups) == [("comp5331poi", "nyc"), ("comp5331poi", "tky")]


def test_fields_of_one_id():
    spec = parse_model_id("comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant")
    assert (spec.org, spec.name, spec.dataset) == (
        "comp5331poi",
        "rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant",
        "nyc",
    )
    assert (spec.div_weight, spec.commitment_weight, spec.lr) == (0.25, 0.5, 5e-5)
    assert (spec.quant_weight, spec.recon_weight, spec.use_kl_divergence) == (0.0, 1.0, False)
    assert spec.csv_name == "codebooks-rqvae-nyc-div0.25-commit0.5-lr5e-5-without_L_quant.csv"
    assert spec.dataset_repo == "comp5331poi/nyc"


@pytest.mark.parametrize(
    ("suffix", "quant", "recon", "kl"),
    [
        ("-without_L_quant", 0.0, 1.0, False),
        ("-without_L_reconstruction", 1.0, 0.0, False),
        ("-withKL", 1.0, 1.0, True),
        ("", 1.0, 1.0, False),
    ],
)
def test_flags(suffix, quant, recon, kl):
    spec = parse_model_id(f"org/rqvae-tky-div0.5-commit0.25-lr1e-3{suffix}")
    assert (spec.quant_weight, spec.recon_weight, spec.use_kl_divergence) == (quant, recon, kl)
    assert spec.lr == 1e-3


def test_defaults_when_fields_absent():
    spec = parse_model_id("org/rqvae-tky")
    assert (spec.div_weight, spec.commitment_weight, spec.lr) == (0.25, 0.25, 5e-5)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("comp5331poi/rqvae-div0.25-commit0.5-lr5e-5", "must say its dataset"),
        ("comp5331poi/rqvae-nyc-tky-div0.25", "both datasets"),
        ("comp5331poi/rqvae-nyc-div0.2.5-commit0.5", "'div0.2.5' is not a number"),
        ("comp5331poi/rqvae-nyc-div0.25-commitx", "'commitx' is not a number"),
        ("comp5331poi/rqvae-nyc-lr5e-", "'lr5e-' is not a number"),
        ("../rqvae-nyc", "may only use"),
        ("a/b/rqvae-nyc", "exactly one '/'"),
        ("org/..rqvae-nyc", "may only use"),
    ],
)
def test_invalid_ids(bad, says):
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_id(bad)
    assert says in str(info.value)
    assert repr(bad) in str(info.value)


def test_all_bad_ids_reported_together():
    with pytest.raises(InvalidModelIdError) as info:
        parse_model_ids(["org/rqvae-div0.1", DEFAULT_MODELS[0], "org/rqvae-nyc-div0..1"])
    assert "rqvae-div0.1" in str(info.value) and "rqvae-nyc-div0..1" in str(info.value)
