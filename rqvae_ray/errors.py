"""Every error rqvae_ray raises on purpose: one base class, and subclasses that carry what they are about.

Each message is one line that names the bad input and what to do about it. Code decides on an error's class (and
its attributes), never on its text. Errors cross process boundaries (Ray pickles an error raised in an actor or a
task), so every class rebuilds from its state without calling ``__init__``.
"""

from __future__ import annotations


class RqvaeRayError(Exception):
    """Base class of the errors rqvae_ray raises on purpose; ``str(error)`` is the one-line reason.

    The reason is kept as ``message`` as well as in ``args``: Ray Data appends its retry advice to the ``args`` of
    an error raised in a task, and that advice is not the reason.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[RqvaeRayError], args: tuple, state: dict) -> RqvaeRayError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidModelIdError(RqvaeRayError, ValueError):
    """A model ID that cannot be parsed."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"{model_id!r}: {reason}")
        self.model_id = model_id
        self.reason = reason


class InvalidModelIdsError(InvalidModelIdError):
    """Several model IDs that cannot be parsed, reported together: ``errors`` maps each to its reason."""

    def __init__(self, errors: dict[str, str]) -> None:
        RqvaeRayError.__init__(self, "; ".join(errors.values()))
        self.errors = errors
        self.model_id, self.reason = next(iter(errors.items()))


class ModelsFileError(RqvaeRayError):
    """A models file that cannot be read, holds no model IDs, or has bad lines (``lines``: their numbers)."""

    def __init__(self, path: str, reason: str, lines: tuple[int, ...] = ()) -> None:
        super().__init__(f"models file {path}: {reason}")
        self.path = path
        self.reason = reason
        self.lines = lines


class ResourceNotFoundError(RqvaeRayError):
    """A model, dataset or hub that the store does not have."""

    def __init__(self, message: str, *, repo: str = "", filename: str = "") -> None:
        super().__init__(message)
        self.repo = repo
        self.filename = filename


class RepoNotFoundError(ResourceNotFoundError):
    """A whole model or dataset repo (or local hub directory) is missing or not visible."""


class FileNotInRepoError(ResourceNotFoundError):
    """The repo exists, but the file ``filename`` is not in it (at that revision)."""


class NotCachedError(ResourceNotFoundError):
    """A file is not in the local cache and the Hub cannot be reached."""


class CheckpointError(RqvaeRayError, ValueError):
    """A checkpoint that cannot be used."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class DatasetError(RqvaeRayError, ValueError):
    """A POI dataset (or one of its rows) that cannot be used."""

    def __init__(self, repo: str, reason: str) -> None:
        super().__init__(f"{repo}: {reason}" if repo else reason)
        self.repo = repo
        self.reason = reason


class InputDimensionError(RqvaeRayError, ValueError):
    """Features whose column indices do not fit the model's input dimension."""

    def __init__(self, column: int, input_dim: int) -> None:
        super().__init__(f"feature column {column} is outside the model's input dimension {input_dim}")
        self.column = column
        self.input_dim = input_dim


class OutputError(RqvaeRayError):
    """Output that cannot be written, or that fails validation."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class OutputWriteError(OutputError):
    """An output that could not be written for a cause outside the run's inputs and options (a full disk, a folder
    removed or made read-only during the run): what was written so far stays resumable."""


class ManifestError(OutputError):
    """A manifest that cannot be read or holds a malformed entry: it is never overwritten, since that would drop the
    entries of the files it describes."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot read the manifest {path}: {reason}; it is left as it is: repair it, or move it aside to redo "
            "the files it describes",
            path=path,
        )
        self.reason = reason


class UploadError(RqvaeRayError):
    """An upload to the Hub that failed for good (the message never holds the token)."""

    def __init__(self, message: str, *, repo: str = "") -> None:
        super().__init__(message)
        self.repo = repo


class MissingTokenError(UploadError):
    """An upload was asked for, but no Hugging Face token is configured."""


class TokenRejectedError(UploadError):
    """The Hub refuses the configured Hugging Face token (revoked, mistyped) or it is read-only."""


class RepoNotWritableError(UploadError):
    """A dataset repo that the configured Hugging Face token may not write to."""


class ReportError(RqvaeRayError):
    """A quality report that cannot be written."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
        self.reason = reason


class CodebooksFileError(RqvaeRayError, ValueError):
    """A codebooks file that is missing, unreadable or not in a codebooks layout."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CodebooksMismatchError(RqvaeRayError, ValueError):
    """Two codebooks files that do not hold the same POIs in the same order, so they cannot be compared."""

    def __init__(self, a: str, b: str, reason: str) -> None:
        super().__init__(f"{a} and {b} do not hold the same POIs: {reason}; compare files of the same dataset")
        self.a = a
        self.b = b
        self.reason = reason


class PoolStartTimeout(RqvaeRayError):
    """The cluster could not hold a dataset's encoder actors within ``--actor-wait-s``."""


class RayStartError(RqvaeRayError):
    """A private local Ray did not start, or the cluster at ``address`` could not be joined; nothing ran."""

    def __init__(self, address: str | None, why: str) -> None:
        if address:
            text = (
                f"could not join the Ray cluster at {address} ({why}); check --address (or RAY_ADDRESS) and that the "
                "cluster is up"
            )
        else:
            text = (
                f"the private Ray of this run did not start ({why}); on a busy machine run again, or run in this "
                "process with --executor local"
            )
        super().__init__(text)
        self.address = address
        self.why = why


class RayConnectionLost(RqvaeRayError):
    """The driver can no longer reach the Ray cluster; unfinished outputs were not published."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"lost the connection to the Ray cluster (GCS at {address} does not answer); finished outputs are "
            "kept, unfinished ones were not published; rerun to complete the rest"
        )
        self.address = address


class StopSignal(KeyboardInterrupt):
    """The process got SIGTERM or SIGHUP: the run stops as on Ctrl-C and exits with status 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Cancelled(RqvaeRayError):
    """The run was interrupted; unfinished outputs were not published."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"{repo}: interrupted; unfinished outputs were not published")
        self.repo = repo


class WriterDied(RqvaeRayError):
    """The run's writer process (a Ray actor) ended in the middle of a dataset; what it wrote so far stays
    resumable."""

    def __init__(self, repo: str, why: str) -> None:
        super().__init__(
            f"{repo}: the writer process ended unexpectedly ({why}); run the same command again: it resumes where "
            "this run stopped"
        )
        self.repo = repo
        self.why = why


def reason_of(error: BaseException) -> str:
    """The one-line reason of a failure, found by class along Ray's wrapping (a ``RayTaskError``'s ``cause``,
    Python's ``__cause__`` and ``__context__``): the first of our own errors, else the type and first line of the
    innermost error that says something (never Ray's retry advice or traceback; Ray wraps some errors around a
    ``SystemException`` without a message, and the wrapper says what happened), else the innermost error's type."""
    chain = error_chain(error)
    for current in chain:
        if isinstance(current, RqvaeRayError) and getattr(current, "cause", None) is None:
            return current.message
    for current in reversed(chain):
        lines = [line.strip() for line in str(current).strip().splitlines() if line.strip()]
        if lines:
            return f"{type(current).__name__}: {lines[0][:300]}"
    return type(chain[-1]).__name__


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        wrapped = getattr(current, "cause", None)
        current = wrapped if isinstance(wrapped, BaseException) else (current.__cause__ or current.__context__)
    return chain
