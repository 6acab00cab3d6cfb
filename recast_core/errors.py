"""Typed errors of recast_core. Every error names what was expected and what was found."""

from __future__ import annotations


class RecastError(Exception):
    """Base class of every error raised on purpose by recast_core."""


class ConfigError(RecastError, ValueError):
    """A RecastConfig is invalid; the message lists every problem at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid RecastConfig: " + "; ".join(self.problems))


class PlanError(RecastError, ValueError):
    """A config does not fit a model (unmatched pattern, shape mismatch, ...); lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("config does not fit the model: " + "; ".join(self.problems))


class BankError(RecastError):
    """A template bank on disk is missing, corrupt, or does not belong to the given backbone."""


class BackboneError(RecastError):
    """A backbone directory cannot be loaded, or its model family is not one the project knows."""


class DataError(RecastError, ValueError):
    """Labelled data cannot be used (missing column, one class, empty file, bad encoding, ...)."""


class ArtifactError(RecastError):
    """Base of every task-artifact validation failure.

    `error_type` is a stable machine-readable name; `expected` and `found` describe the mismatch.
    """

    error_type = "invalid_artifact"

    def __init__(self, message: str, *, expected: object = None, found: object = None) -> None:
        self.expected = expected
        self.found = found
        detail = message
        if expected is not None or found is not None:
            detail = f"{message} (expected {expected}, found {found})"
        super().__init__(detail)


class ArtifactTooLarge(ArtifactError):
    error_type = "artifact_too_large"


class ArtifactCorrupt(ArtifactError):
    """The bytes are not a well-formed safetensors file (truncated, bad header, bad offsets)."""

    error_type = "artifact_corrupt"


class ArtifactKeyError(ArtifactError):
    error_type = "artifact_keys"


class ArtifactShapeError(ArtifactError):
    error_type = "artifact_shape"


class ArtifactDtypeError(ArtifactError):
    error_type = "artifact_dtype"


class ArtifactNonFinite(ArtifactError):
    error_type = "artifact_non_finite"


class ArtifactMetadataError(ArtifactError):
    error_type = "artifact_metadata"


class FingerprintMismatch(ArtifactError):
    error_type = "fingerprint_mismatch"


class LabelCountMismatch(ArtifactError):
    error_type = "label_count_mismatch"


class ArtifactValueError(ArtifactError):
    """Finite values too large to serve: logits could overflow in the serving dtype."""

    error_type = "artifact_values"


class ArtifactChecksumMismatch(ArtifactError):
    """The tensor bytes do not hash to the sha256 the metadata records (corrupted in transit or at rest)."""

    error_type = "artifact_checksum"
