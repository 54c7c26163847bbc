"""The errors module: every class survives pickling (Ray ships errors between processes) with what it carries, and
``reason_of`` finds the reason by class through Ray's and Python's wrapping."""

from __future__ import annotations

import pickle

import pytest

from rqvae_ray import errors

CASES = [
    (errors.InvalidModelIdError("org/x", "bad"), {"model_id": "org/x", "reason": "bad"}),
    (errors.InvalidModelIdsError({"a": "'a': one", "b": "'b': two"}), {"errors": {"a": "'a': one", "b": "'b': two"}}),
    (errors.FileNotInRepoError("no file", repo="o/d", filename="f.csv"), {"repo": "o/d", "filename": "f.csv"}),
    (errors.CheckpointError("o/m", "corrupt"), {"source": "o/m", "reason": "corrupt"}),
    (errors.DatasetError("o/d", "NaN at Pid 3"), {"repo": "o/d", "reason": "NaN at Pid 3"}),
    (errors.InputDimensionError(2000, 1407), {"column": 2000, "input_dim": 1407}),
    (errors.OutputError("read-only", path="/x"), {"path": "/x"}),
    (errors.MissingTokenError("no token"), {"repo": ""}),
    (errors.ReportError("/r.png", "disk full"), {"path": "/r.png", "reason": "disk full"}),
    (errors.WriterDied("o/d", "it was killed or crashed"), {"repo": "o/d", "why": "it was killed or crashed"}),
    (errors.OutputWriteError("disk full", path="/x"), {"path": "/x"}),
    (errors.ManifestError("/m.json", "not JSON"), {"path": "/m.json", "reason": "not JSON"}),
    (errors.RayConnectionLost("127.0.0.1:6379"), {"address": "127.0.0.1:6379"}),
    (errors.Cancelled("o/d"), {"repo": "o/d"}),
]


@pytest.mark.parametrize(("error", "attributes"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_round_trip_through_pickle(error, attributes):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert isinstance(again, errors.RqvaeRayError)
    for name, value in attributes.items():
        assert getattr(again, name) == value


def test_messages_name_what_they_are_about():
    assert str(errors.DatasetError("o/d", "bad rows")) == "o/d: bad rows"
    assert str(errors.DatasetError("", "bad rows")) == "bad rows"
    assert str(errors.CheckpointError("o/m", "corrupt")) == "o/m: corrupt"
    assert str(errors.InvalidModelIdError("o/x", "bad")) == "'o/x': bad"
    assert "1407" in str(errors.InputDimensionError(2000, 1407))


class _Wrapper(Exception):
    """Stands in for Ray's RayTaskError: the original error is its ``cause``, its own text is a traceback."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("Traceback (most recent call last):\n  File ...\nTo change retry attempts, configure ...")
        self.cause = cause


def test_reason_of_finds_our_error_inside_wrappers():
    inner = errors.DatasetError("o/d", "features contain NaN or Inf (first at Pid 42); fix the feature files")
    try:
        try:
            raise inner
        except errors.DatasetError as exc:
            raise RuntimeError("Ray Data: task failed, to change retry attempts ...") from exc
    except RuntimeError as exc:
        outer = _Wrapper(exc)
    assert errors.reason_of(outer) == str(inner)


def test_reason_of_foreign_error_is_its_innermost_type_and_first_line():
    try:
        try:
            raise KeyError("Pid")
        except KeyError as exc:
            raise RuntimeError("wrapped\nmore") from exc
    except RuntimeError as exc:
        assert errors.reason_of(_Wrapper(exc)) == "KeyError: 'Pid'"
    assert errors.reason_of(ValueError("")) == "ValueError"


def test_reason_of_an_error_around_one_without_a_message_is_the_wrappers():
    """Ray raises some errors (an unschedulable task) from a ``SystemException`` that says nothing."""

    class SystemException(Exception):
        pass

    try:
        try:
            raise SystemException()
        except SystemException as exc:
            raise RuntimeError("The task is not schedulable: the node is infeasible\nlease_id=...") from exc
    except RuntimeError as exc:
        assert errors.reason_of(_Wrapper(exc)) == "RuntimeError: The task is not schedulable: the node is infeasible"


def test_the_reason_survives_advice_appended_to_args():
    error = errors.DatasetError("o/d", "features contain NaN or Inf (first at Pid 42); fix the feature files")
    error.args = (error.args[0] + "\nFailed to apply UDF transform after 1/1 attempts.\nTo change retry attempts ...",)
    again = pickle.loads(pickle.dumps(error))
    assert (
        str(again)
        == errors.reason_of(_Wrapper(again))
        == "o/d: features contain NaN or Inf (first at Pid 42); fix the feature files"
    )
