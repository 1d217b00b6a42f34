"""The exceptions that mean "bad input" (exit status 2, a message and no traceback) for every
entry point: a config, manifest, model or store problem found before any work started."""
from __future__ import annotations

from genpi.config import ConfigError
from genpi.manifest import ManifestError
from genpi.models import ModelError

INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ManifestError, ModelError, LookupError,
                                                 FileNotFoundError)


class ResourceError(RuntimeError):
    """The Ray cluster cannot provide what a stage asks for; the message names the stage and
    what is missing. The pipeline records it as that stage's failure of every prompt in it."""
