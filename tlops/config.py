"""Typed, frozen configuration: params.yaml blocks -> one dataclass per stage.

Loading is strict: an unknown key or a value of the wrong type fails before any work, naming
the dotted key. Overrides use the same dotted keys as `dvc exp run -S`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from components.compress import CompressConfig
from components.evaluate import EvaluateConfig
from components.export import ExportConfig
from components.features import FeaturesConfig
from components.finetune import FinetuneConfig
from components.ingest import IngestConfig
from components.select import SelectConfig
from components.validate import ValidateConfig


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


@dataclass(frozen=True)
class PathsConfig:
    """Where every stage writes, relative to the working directory (the repo root)."""

    dataset: str = "outputs/ingest"
    validate: str = "outputs/validate"
    features: str = "outputs/features"
    feature_cache: str = ".cache/features"
    select: str = "outputs/select"
    finetune: str = "outputs/finetune"
    export: str = "outputs/export"
    compress: str = "outputs/compress"
    evaluate: str = "outputs/evaluate"
    register: str = "outputs/register"


@dataclass(frozen=True)
class RegisterConfig:
    experiment: str = "tlops"
    model_name: str = "tlops-elpv"
    alias: str = "challenger"


@dataclass(frozen=True)
class Params:
    paths: PathsConfig = field(default_factory=PathsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def path(self, name: str) -> Path:
        return Path(getattr(self.paths, name))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "params"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key; {where} accepts {known}")
    values = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    return cls(**values)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`a.b.c=VALUE`, VALUE parsed as YAML (so `0.1` is a float, `[a, b]` a list, `null` None)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. finetune.lr=0.01")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a block of keys")
        node = child
    node[leaf] = yaml.safe_load(text)


def load_params(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: params file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return build(Params, raw)
    except ConfigError as error:
        source = f"{path}: " if path else ""
        raise ConfigError(f"{source}{error}") from None
