"""LightningModules (systems), their metrics and callbacks; plain networks live in ``nets``."""

from lightning_modules.parsing import ParsingLitModule

__all__ = ["ParsingLitModule"]
