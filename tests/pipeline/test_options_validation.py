"""``--base-folder`` is checked where the options are made, for the command line and the Python API alike: a path
that is empty, absolute or climbs out (``..``) would put outputs at the file system's root or outside ``--out-dir``."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rqvae_ray.api.batch_inference import BatchInferenceProcessor
from rqvae_ray.cli.app import app
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.layout import output_dir
from rqvae_ray.pipeline.options import make_options

BAD = [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("/srv/x", "it is an absolute path"),
    ("../../../../x", "'..' is not a folder name"),
    ("a/../../b", "'..' is not a folder name"),
    ("a/./b", "'.' is not a folder name"),
    ("a//b", "it has an empty folder name"),
    ("a/", "it has an empty folder name"),
    ("a\\..\\b", "it holds a backslash"),
    ("a\nb", "it holds a control character"),
    (" LLM Dataset", "the folder name ' LLM Dataset' starts or ends with a space"),
]


@pytest.mark.parametrize(("folder", "reason"), BAD, ids=[repr(folder) for folder, _ in BAD])
def test_a_base_folder_that_is_not_a_relative_path_of_names_is_refused(tmp_path, folder, reason):
    with pytest.raises(OutputError) as caught:
        make_options(out_dir=tmp_path, base_folder=folder)
    message = str(caught.value)
    assert message.startswith(f"--base-folder {folder!r}: {reason}") and "\n" not in message, message
    assert message.endswith("give a folder inside the dataset repo such as 'LLM Dataset' or 'a/b'")
    with pytest.raises(OutputError, match="--base-folder"):
        BatchInferenceProcessor(out_dir=tmp_path, base_folder=folder or " ")


@pytest.mark.parametrize("folder", ["LLM Dataset", "a/b", "My data/v2.1/SIDs", "x"])
def test_plain_relative_folders_are_kept_inside_the_output_directory(tmp_path, folder):
    options = make_options(out_dir=tmp_path, base_folder=folder)
    assert options.base_folder == folder
    assert output_dir(tmp_path, "org/nyc", folder).resolve().is_relative_to(tmp_path / "datasets" / "org" / "nyc")


@pytest.mark.parametrize("folder", ["", "../../../../x"])
def test_a_bad_base_folder_is_a_usage_error_of_the_command_line(tmp_path, folder):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["--hub-dir", str(tmp_path), "--out-dir", str(out), "--debug", "--base-folder", folder]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--base-folder {folder!r}: " in lines[0], result.output
    assert not out.exists() and not (tmp_path / "x").exists()


def test_the_retry_backoff_reaches_downloads_and_uploads(tmp_path):
    options = make_options(out_dir=tmp_path, retry_backoff_s=0.25)
    assert options.retry_backoff_s == 0.25 and options.hub.backoff_s == 0.25
    assert make_options(out_dir=tmp_path).hub.backoff_s == 1.0


def test_a_negative_retry_backoff_is_a_usage_error_of_the_command_line(tmp_path):
    result = CliRunner().invoke(app, ["--hub-dir", str(tmp_path), "--retry-backoff-s", "-1"])
    assert result.exit_code == 2 and "--retry-backoff-s" in result.output, result.output
