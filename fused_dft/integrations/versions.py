"""The one version check of every trainer adapter (no trainer import: unit-tested alone)."""

from __future__ import annotations


def check_tested_version(caller: str, trainer: str, package: str, version: str,
                         tested: tuple[str, ...], kind: str, may_differ: str) -> None:  # fmt: skip
    """RuntimeError unless `version` of the trainer is one the adapter was run against (`tested`,
    newest last): another release may have moved what `may_differ` names. caller: the adapter's
    module; trainer: its name as users write it; package: its pip name; kind: "adapter" or
    "plugin"."""
    if version not in tested:
        raise RuntimeError(
            f"{caller}: {trainer} {version} is not a version this {kind} was tested with "
            f"({', '.join(tested)}); {may_differ} may differ. Install {package}=={tested[-1]}"
        )
