"""Configuration as dataclasses, loaded from YAML with ``key=value`` overrides.

Unknown keys and badly typed values raise `ConfigError` naming the key, so a typo in a
config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lumbar_tf.core.errors import ConfigError


@dataclass
class ViewSpec:
    """One model input view: three sagittal slices of one series chosen by lateral offset.

    Args:
        name: input name of the view (e.g. ``sag_t2``).
        series_description: RSNA series description it is built from.
        offsets_mm: lateral offsets of the three channels, patient-left positive, from the midline
            plane `preprocess.find_spine` finds.
        offsets: where ``offsets_mm`` come from. ``fixed``: as written. ``labels``: learned by
            `prepare_cache` from the labelled instances of the coordinates file
            (`data.slice_offsets`), ``offsets_mm`` being the fallback; the cache, and the model
            trained on it, then hold ``learned`` with the learned numbers, which every runtime uses
            as written (never re-learned, e.g. on an evaluation folder).
    """

    name: str = "sag_t2"
    series_description: str = "Sagittal T2/STIR"
    offsets_mm: tuple[float, float, float] = (12.0, 0.0, -12.0)
    offsets: str = "fixed"


# ViewSpec.offsets: "labels" is resolved by prepare_cache into "learned" (or "fixed", the fallback).
OFFSET_SOURCES = ("fixed", "labels", "learned")


def _default_views() -> list[ViewSpec]:
    return [
        ViewSpec("sag_t2", "Sagittal T2/STIR", (12.0, 0.0, -12.0)),
        ViewSpec("sag_t1", "Sagittal T1", (22.0, 0.0, -22.0)),
    ]


@dataclass
class AxialSpec:
    """The axial view: per level, the Axial T2 slice nearest the level's 3-D point and its neighbours
    as channels, cropped around the point's projection (`lumbar_tf.axial`; subarticular stenosis).

    Args:
        name: input name of the axial crops (``ax_t2``).
        series_description: RSNA series description it is read from.
        crop_mm: side of the square crop in mm (resampled to ``PreprocessConfig.crop_size``).
        neighbours: slices on each side of the nearest one; channels = 2 * neighbours + 1 (3: the
            grader's backbone is shared with the sagittal crops).
        slice_shift: training moves the centre slice by up to this many slices (the projection
            picks a neighbour when the localiser errs by a few mm, `benchmarks/axial_projection_results.md`).
        shift_mm: training moves the crop in-plane by up to this (the projection's error).
        dropout: training zeroes a level's axial crop at this rate (a level no stack covers).
    """

    name: str = "ax_t2"
    series_description: str = "Axial T2"
    crop_mm: float = 60.0
    neighbours: int = 1
    slice_shift: int = 1
    shift_mm: float = 4.0
    dropout: float = 0.15

    @property
    def channels(self) -> int:
        return 2 * self.neighbours + 1


@dataclass
class PreprocessConfig:
    """DICOM -> model-ready views and level crops (see docs/architecture.md)."""

    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    spine_crop_mm: float = 200.0
    view_size: int = 192
    crop_mm: float = 60.0
    crop_size: int = 64
    views: list[ViewSpec] = field(default_factory=_default_views)
    axial: AxialSpec | None = None  # None: sagittal views only

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.views)

    @property
    def localizer_view(self) -> str:
        """The localiser reads the first view (midline channel in the middle)."""
        return self.views[0].name


AXIAL_POOLINGS = ("sides", "global")


@dataclass
class ModelConfig:
    """Architecture of the localiser and the grader."""

    localizer_size: int = 128
    localizer_filters: tuple[int, ...] = (16, 32, 64, 96, 128)
    localizer_convs_per_block: int = 2
    localizer_head_units: int = 256
    backbone: str = "small_cnn"
    small_cnn_filters: tuple[int, ...] = (16, 32, 64, 128)
    weights: str | None = None
    level_embedding_dim: int = 8
    head_units: int = 128
    dropout: float = 0.3
    # How the grader pools the axial crop's feature map: "sides" keeps the patient-right and -left halves
    # apart (`models.networks.SidePooling`: which recess is narrowed), "global" averages them together.
    axial_pooling: str = "sides"


@dataclass
class LossConfig:
    """Masked BCE plus weighted focal loss on the ordinal thresholds."""

    focal_weight: float = 0.5
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    apply_class_balancing: bool = False
    severity_weights: tuple[float, float, float] = (1.0, 2.0, 4.0)


@dataclass
class StageConfig:
    """Optimiser and schedule of one training stage."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    early_stopping_patience: int = 5


@dataclass
class TrainConfig:
    """Training of both stages."""

    seed: int = 0
    folds: int = 5
    val_fold: int = 0
    mixed_precision: str = "auto"  # auto | mixed_float16 | float32
    crop_jitter_mm: float = 4.0
    localizer: StageConfig = field(default_factory=lambda: StageConfig(epochs=30, batch_size=16))
    grader: StageConfig = field(default_factory=lambda: StageConfig(epochs=15, batch_size=64))
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class Config:
    """Everything a run needs; stored resolved in the run folder."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# === Loading ===


def _coerce(value, annotation, key: str):
    """Check/convert a YAML value to the dataclass field type; raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else typing.Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown config key")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    """A plain, YAML-safe dict (tuples as lists)."""

    def plain(obj):
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return plain(dataclasses.asdict(config))


def _set_path(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: unknown config key")
    node[parts[-1]] = value


BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def builtin_config(name: str) -> Path:
    """The YAML file of a config shipped with the package (``cpu_demo``, ``gpu_effnetb3``)."""
    path = BUILTIN_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"{name}: no such config file or built-in config (built-in: {known})")
    return path


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a built-in config (package data, so a non-editable
    install finds it from any folder)."""
    path = Path(path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return builtin_config(path.name)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (a file, a built-in name, or defaults) and apply ``a.b=value`` overrides
    (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    tree = config_to_dict(_from_dict(Config, tree))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    config = _from_dict(Config, tree)
    _validate(config)
    return config


def _check(checks) -> None:
    for key, ok in checks:
        if not ok:
            raise ConfigError(f"{key}: bad value")


def validate_preprocess(p: PreprocessConfig) -> PreprocessConfig:
    """The one check of preprocessing parameters: training configs, model files and export
    metadata all pass through it."""
    _check(
        [
            ("preprocess.view_size", p.view_size >= 16),
            ("preprocess.crop_size", p.crop_size >= 16),
            ("preprocess.spine_crop_mm", p.spine_crop_mm > 0),
            ("preprocess.crop_mm", 0 < p.crop_mm <= p.spine_crop_mm),
            ("preprocess.views", len(p.views) >= 1 and len({v.name for v in p.views}) == len(p.views)),
            *((f"preprocess.views[{i}].offsets", v.offsets in OFFSET_SOURCES) for i, v in enumerate(p.views)),
        ]
    )
    if p.axial is not None:
        _validate_axial(p)
    return p


def _validate_axial(p: PreprocessConfig) -> None:
    a = p.axial
    _check(
        [
            ("preprocess.axial.name", bool(a.name) and a.name not in (*p.view_names, "level_index")),
            ("preprocess.axial.crop_mm", a.crop_mm > 0),
            ("preprocess.axial.neighbours", a.neighbours == 1),  # 3 channels: the shared backbone's input
            ("preprocess.axial.slice_shift", 0 <= a.slice_shift <= 3),
            ("preprocess.axial.shift_mm", 0 <= a.shift_mm < a.crop_mm / 2),
            ("preprocess.axial.dropout", 0.0 <= a.dropout < 1.0),
        ]
    )


def _validate(config: Config) -> None:
    validate_preprocess(config.preprocess)
    checks = [
        ("train.mixed_precision", config.train.mixed_precision in ("auto", "mixed_float16", "float32")),
        ("train.val_fold", 0 <= config.train.val_fold < config.train.folds),
        ("model.dropout", 0.0 <= config.model.dropout < 1.0),
        ("model.axial_pooling", config.model.axial_pooling in AXIAL_POOLINGS),
    ]
    _check(checks)


def save_config(config: Config, path: str | Path) -> None:
    from lumbar_tf.core.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def preprocess_config_from_dict(values: dict) -> PreprocessConfig:
    """A checked PreprocessConfig from its plain-dict form (as stored in models and export metadata)."""
    if not isinstance(values, dict):
        raise ConfigError("preprocess: expected a mapping")
    return validate_preprocess(_from_dict(PreprocessConfig, values, "preprocess"))
