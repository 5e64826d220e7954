"""One typed parameter schema per stage, and the one merge rule: defaults < params files < command line.

Every stage that reads a `params.yaml` section (import, masks_to_boxes, teach, train, predict, evaluate,
export; `engine`, which teach, predict and finalize share) resolves its settings here, so the CLI, `params.yaml`, `dvc exp run -S` and the benchmark suite all
get the same checks. Values are coerced to the declared type (a quoted `'3'` becomes 3) and checked against
the ranges below; NaN, infinities, unknown keys, wrong types and booleans in place of numbers (or numbers in
place of booleans) are refused. Every problem is reported at once, each naming the file (or command-line
option) and the key. `b2p.params.SECTIONS` lists every top-level section a params file may hold: any other is refused.

The schemas are built from the dataclasses the stages already use (`TrainParams`, `TeachConfig`,
`GrabCutSettings`) so each key is declared once, where it is used; this module adds only the ranges and
the allowed choices (`CONSTRAINTS`), keyed by field name. A field added to one of those dataclasses is
typed-checked at once, with no change here.

Command line: each stage command takes its usual options plus a generic, repeatable `--set KEY=VALUE`
(VALUE is read as YAML: `--set lr=5e-4`, `--set taps=[1,2,4]`, `--set grabcut.iterations=3`), so any key
can be overridden without editing a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from b2p.errors import B2PError

COMMAND_LINE = "command line"

# coercion from YAML/CLI text ("5e-4" -> 0.0005, "3" -> 3); no NaN / inf anywhere; booleans and numbers do
# not stand in for each other (`_Params._strict_scalars`)
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True, validate_default=True)


def _scalar_kind(annotation: Any) -> str | None:
    """'bool', 'int' or 'float' for a field of that type (Optional and Annotated unwrapped), 'list:<kind>'
    for a list of one, else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _scalar_kind(args[0])
    if origin is list and args:
        inner = _scalar_kind(args[0])
        return f"list:{inner}" if inner in ("bool", "int", "float") else None
    if args and origin is not None and type(None) in args:  # X | None
        kinds = {_scalar_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return {bool: "bool", int: "int", float: "float"}.get(annotation)


def _strict_value(kind: str, v: Any) -> Any:
    """`epochs: true` must not train 1 epoch, nor `refine: 1` or `refine: yes` switch a flag: a boolean field
    takes true / false only (the YAML value, or that word as text), a number field never takes a boolean."""
    if v is None:
        return v
    if kind == "bool":
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        if not isinstance(v, bool):
            raise ValueError(f"must be a boolean (true or false), got {v!r}")
    elif isinstance(v, bool):
        raise ValueError(f"must be {'an integer' if kind == 'int' else 'a number'}, not a boolean: got {v!r}")
    return v


class _Params(BaseModel):
    """Base of every parameter model: forbids unknown keys, NaN / inf, and booleans for numbers (and back)."""

    model_config = _CONFIG

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, v: Any, info: ValidationInfo) -> Any:
        kind = _scalar_kind(cls.model_fields[info.field_name].annotation)
        if kind is None:
            return v
        if kind.startswith("list:"):
            return [_strict_value(kind[5:], x) for x in v] if isinstance(v, list) else v
        return _strict_value(kind, v)


def _choices(values: Callable[[], Sequence[str]]) -> Callable[[Any], Any]:
    """A check that a value is one of `values()` (looked up late: the owning module keeps the list)."""

    def check(v: Any) -> Any:
        allowed = tuple(values())
        if v is not None and v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1, cutoff=0.4)
            raise ValueError(f"must be one of {list(allowed)}, got {v!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return v

    return check


def _comma_list(v: Any) -> Any:
    """`1,2,4` (a CLI or YAML string) -> [1, 2, 4] items, for list fields."""
    if isinstance(v, str):
        return [t for t in v.replace(" ", "").strip("[]").split(",") if t]
    return v


def _model_choices(name: str) -> Callable[[], Sequence[str]]:
    return lambda: _attr(name)


# Ranges and choices by field name, per schema. Field(...) keywords: ge / gt / le / lt; "choices": a
# callable giving the allowed strings (kept in the module that uses them).
CONSTRAINTS: dict[str, dict[str, dict[str, Any]]] = {
    "train": {
        "arch": {"choices": _model_choices("b2p.student.model.ARCHS")},
        "adaptation": {"choices": _model_choices("b2p.student.model.ADAPTATIONS")},
        "decoder": {"choices": _model_choices("b2p.student.model.DECODERS")},
        "context": {"choices": _model_choices("b2p.student.model.CONTEXTS")},
        "backbone": {"choices": _model_choices("b2p.student.backbones.BACKBONES")},
        "augment": {"choices": _model_choices("b2p.student.data.AUGMENTATIONS")},
        "feature_cache": {"choices": lambda: ("auto", "memory", "disk", "off")},
        "self_correction_region": {"choices": lambda: ("all", "boxes")},
        "tile_size": {"ge": 16},
        "scale": {"gt": 0},
        "crops_per_image": {"ge": 1},
        "box_crop_fraction": {"ge": 0, "le": 1},
        "decoder_dim": {"ge": 1},
        "unet_base": {"ge": 1},
        "epochs": {"ge": 1},
        "batch_size": {"ge": 1},
        "lr": {"gt": 0, "le": 1},
        "weight_decay": {"ge": 0},
        "grad_clip": {"gt": 0},
        "ema_decay": {"ge": 0, "lt": 1},
        "patience": {"ge": 1},
        "seed": {"ge": 0},
        "num_workers": {"ge": 0},
        "processes": {"ge": 1},
        "dice_beta": {"ge": 0, "le": 1},
        "bg_weight": {"ge": 0},
        "defect_weight": {"ge": 0},
        "class_balance": {"ge": 0, "le": 2},
        "tau": {"ge": 0, "le": 1},
        "warmup_epochs": {"ge": 0},
        "outside_box_bg_weight": {"ge": 0},
        "w_binary": {"ge": 0},
        "w_fine": {"ge": 0},
    },
    "teach": {
        "teacher": {"choices": _model_choices("b2p.teach.config.TEACHERS")},
        "sam_model": {"choices": lambda: tuple(_attr("b2p.teach.weights.MODEL_SIZES"))},
        "mask_select": {"choices": lambda: ("box", "iou", "single")},
        "clip_margin": {"ge": 0},
        "decoder_batch": {"ge": 1},
    },
    "engine": {
        "name": {"choices": _model_choices("b2p.scale.engine.ENGINES")},
        "workers": {"ge": 1},
        "cpus_per_worker": {"gt": 0},
        "gpus_per_worker": {"ge": 0},
        "max_retries": {"ge": 0},
    },
    "grabcut": {
        "iterations": {"ge": 1},
        "context_frac": {"ge": 0},
        "context_px": {"ge": 1},
        "min_side": {"ge": 2},
        "min_background": {"ge": 5},
        "min_context_ratio": {"ge": 0},
        "min_fill": {"ge": 0, "lt": 1},
        "rim": {"ge": 0, "le": 1},
        "empty": {"choices": lambda: ("box", "keep")},
    },
}


def _annotated(hint: Any, rule: dict[str, Any]) -> Any:
    rule = dict(rule)
    choices = rule.pop("choices", None)
    meta: list[Any] = []
    if rule:
        meta.append(Field(**rule))
    if choices is not None:
        meta.append(BeforeValidator(_choices(choices)))
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list or (args and any(typing.get_origin(a) is list for a in args)):
        meta.append(BeforeValidator(_comma_list))
    return Annotated[(hint, *meta)] if meta else hint


def model_of_dataclass(cls: type, constraints: Mapping[str, dict[str, Any]], name: str, nested: Mapping[str, Any] | None = None) -> type[BaseModel]:
    """A pydantic model with `cls`'s fields, types and defaults, plus `constraints`; `nested` replaces the
    type of a field (a dict of settings that has its own schema)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = (nested or {}).get(f.name, hints[f.name])
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        fields[f.name] = (_annotated(hint, constraints.get(f.name, {})), default)
    return create_model(name, __base__=_Params, **fields)


# --- stage schemas that have no dataclass of their own ------------------------------------------------------

Fraction = Annotated[float, Field(ge=0, le=1)]


class _SplitFractions(_Params):
    val: Fraction = 0.15  # share of the images without a forced split that validate (pick the kept epoch)
    test: Fraction = 0.15  # share of the images without a forced split that go to test
    salt: str = "b2p"  # salt of the split hash: another salt, another split of the same images
    calib: Fraction = 0.0  # share of the manually masked images that choose settings instead of being tested

    @model_validator(mode="after")
    def _fractions_fit(self):
        if self.val + self.test > 1:
            raise ValueError(f"val + test must be at most 1, got {self.val} + {self.test}")
        return self


class ImportParams(_SplitFractions):
    """`import:` - the hashed split rule (the same for every batch)."""

    manual_masks_split: typing.Literal["test", "hash"] = "test"  # where manually masked images go (not calib): test, or by the hash

    def split_rule(self):
        from b2p.splits import SplitRule

        return SplitRule(val=self.val, test=self.test, salt=self.salt, manual_masks=self.manual_masks_split, calib=self.calib)


class MasksToBoxesParams(_SplitFractions):
    """`masks_to_boxes:` - simulated box annotation of a dataset with manual masks."""

    strip_prefix: str = ""  # removed from class folder names (auto: the prefix all class folders share)
    threshold: Annotated[int, Field(ge=1, le=255)] = 128  # a mask pixel at least this bright is defect
    min_area: Annotated[int, Field(ge=1)] = 10  # smaller mask components are annotation noise: no box
    free_images: Annotated[int, Field(ge=0)] | None = None  # at most this many defect-free images kept (null: all)
    masked: Fraction | None = None  # keep the masks of this hashed share of the images (import splits them)

    def split_rule(self):
        from b2p.splits import SplitRule

        return SplitRule(val=self.val, test=self.test, salt=self.salt, calib=self.calib)


class EvaluateParams(_Params):
    """`evaluate:` - which split is scored, and the report's options."""

    split: typing.Literal["test", "val", "train", "calib", "all"] = "test"  # the split whose manual masks score
    worst: Annotated[int, Field(ge=0)] = 8  # overlays of this many worst images (by the shipped student's binary IoU)
    size_bins: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], BeforeValidator(_comma_list)] = [0.001, 0.01]  # defect size bins of the noise analysis, fractions of the image
    min_cover: Fraction = 0.5  # a true defect counts as found when this share of it is covered


class PredictParams(_Params):
    """`predict:` - read by dvc.yaml into `b2p predict` options (checked here with the rest of the file)."""

    split: typing.Literal["test", "val", "train", "calib", "all"] = "test"  # the split predicted (the recipe: all)
    batch_size: Annotated[int, Field(ge=1)] = 4  # windows per forward pass
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda
    box_threshold: Fraction = 0.5  # p(defect) a pixel needs inside a box in the box-guided masks (--boxes-out)
    window: Annotated[int, Field(ge=1)] | None = None  # sliding-window side, px at model scale (null: the training tile for a strip-context model, else 512)
    tta: typing.Literal["none", "flips"] = "none"  # test-time augmentation: flips averages the logits of the image and its 3 flips
    precision: typing.Literal["float32", "bfloat16", "auto"] = "float32"  # arithmetic: bfloat16 autocast where the hardware has it; auto picks
    snap: typing.Literal["none", "grabcut"] = "none"  # also write the student's maps snapped to the image by GrabCut (--snap-out)
    snap_sure: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.9  # with snap: p(defect) at least this is fixed defect, at most 1 - this fixed background
    overlap: Annotated[float, Field(ge=0, le=0.9)] = 0.25  # sliding-window overlap, a fraction of the window


class ExportParams(_Params):
    """`export:` - the pixel dataset for other tools (b2p/export/export.py)."""

    formats: Annotated[list[typing.Literal["coco", "yolo", "semantic"]], BeforeValidator(_comma_list)] = ["coco", "yolo", "semantic"]  # which formats
    source: str = "final"  # the masks of the images with boxes: final | combined | teacher | student | boxes | snapped
    unboxed: str | None = None  # the masks of the images without boxes: student (the shipped student's), or null (the source's)
    splits: Annotated[list[str], BeforeValidator(_comma_list)] = []  # the splits exported ([] = every split)
    images: typing.Literal["copy", "symlink", "hardlink"] = "copy"  # how the images get into the export
    coco_masks: typing.Literal["rle", "polygons"] = "rle"  # COCO segmentation: rle (exact, holes kept) or polygons


class FinalizeParams(_Params):
    """`finalize:` - the final masks and the student alone, chosen on calib (b2p/finalize/final.py)."""

    student_snap: bool = True  # the student's maps snapped to the image are candidates of its rule too


StudentName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]


class OracleParams(_Params):
    """`oracle:` - the benchmark's fully supervised rows (data/manual: every image's manual mask)."""

    students: Annotated[list[StudentName], Field(max_length=1)] = []  # at most one: its rows go to data/eval_oracle


class DemoParams(_Params):
    """One entry of `demos:` - an embedded synthetic batch (`b2p demo-data`)."""

    seed: Annotated[int, Field(ge=0)] = 0  # the same seed gives byte-identical files
    images: Annotated[int, Field(ge=1)] = 48  # how many images
    size: Annotated[int, Field(ge=64, le=2048)] = 128  # image side, px (square)
    mask_fraction: Fraction = 0.3  # share of the images with an exact manual mask (they form calib and test)


class RecipeParams(BaseModel):
    """The recipe's lists (dvc.yaml): which student variants are trained in which group."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # the stage sections are checked on their own
    students: dict[StudentName, dict[str, Any] | None] = {}  # student variants: NAME: {train: {...}, predict: {...}} over `train:` / `predict:`
    candidates: Annotated[list[StudentName], Field(min_length=1)] = ["bitfit"]  # round 1: trained on the teacher's masks; their final masks are combined
    distill: Annotated[list[StudentName], Field(min_length=1)] = ["lite"]  # trained on the combined masks; the shipped model is the best student alone on calib
    oracle: OracleParams = OracleParams()  # benchmarks: students trained on every image's manual mask
    demos: dict[StudentName, DemoParams] = {}  # embedded synthetic batches (`b2p demo-data`), one per entry

    @model_validator(mode="after")
    def _names_known(self):
        for key, names in (("candidates", self.candidates), ("distill", self.distill), ("oracle.students", self.oracle.students)):
            unknown = [n for n in names if n not in self.students]
            if unknown:
                raise ValueError(f"`{key}` names {unknown}, not variants of `students:` ({sorted(self.students)})")
            if len(set(names)) != len(names):
                raise ValueError(f"`{key}` names a student twice: {names}")
        return self


def check_recipe(path: str | Path) -> RecipeParams:
    """The recipe's lists and every student variant of a params file, checked (one error naming the file)."""
    from b2p.params import read_params_file

    data = read_params_file(path)
    try:
        recipe = RecipeParams.model_validate({k: data[k] for k in ("students", "candidates", "distill", "oracle", "demos") if k in data})
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise B2PError("invalid recipe parameters: " + "; ".join(lines), path) from None
    for name in recipe.students:
        for stage in VARIANT_SECTIONS:
            resolve(stage, [path], student=name)  # every variant must be a valid set of that stage's keys
    return recipe




TRAIN_PARAMS = "b2p.student.train.TrainParams"


def _attr(dotted: str) -> Any:
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


# the dataclasses are looked up by name, so that a stage loads only its own code (teach never imports the
# student) and its DVC dependencies stay exactly the code it runs (tests/test_dvc_deps.py)
def _teach_model() -> type[BaseModel]:
    grabcut = model_of_dataclass(_attr("b2p.teach.grabcut.GrabCutSettings"), CONSTRAINTS["grabcut"], "GrabCutParams")
    return model_of_dataclass(_attr("b2p.teach.config.TeachConfig"), CONSTRAINTS["teach"], "TeachParams", nested={"grabcut": grabcut})


def _train_model() -> type[BaseModel]:
    return model_of_dataclass(_attr(TRAIN_PARAMS), CONSTRAINTS["train"], "TrainParamsSchema")


# Every top-level section a b2p params file may hold (params.yaml, pipelines/*/params.yaml, a student variant
# file), with its model: a section not listed here is refused, naming the closest known one, so `trian:` is
# never silently ignored. A new section is one entry here: its model (a loader), or None for a section whose
# contents the pipeline's own code reads and checks (b2p/pipeline, dvc.yaml interpolation) rather than a
# command through `resolve`.
@functools.cache
def schema(stage: str) -> type[BaseModel]:
    """The pydantic model of a params section (built once; train/teach from their dataclasses)."""
    from b2p.params import SECTIONS

    name = SECTIONS.get(stage)
    if name is None:
        raise KeyError(f"no parameter schema for section {stage!r}")
    model = globals()[name]
    return model if isinstance(model, type) else model()


def _engine_model() -> type[BaseModel]:
    return model_of_dataclass(_attr("b2p.scale.engine.EngineConfig"), CONSTRAINTS["engine"], "EngineParams")


def _typed_sections() -> tuple[str, ...]:
    from b2p.params import SECTIONS

    return tuple(name for name, model in SECTIONS.items() if model is not None)


STAGES = _typed_sections()  # the typed sections


# --- merging and validating --------------------------------------------------------------------------------


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set a=1 --set grabcut.iterations=3` -> {"a": 1, "grabcut": {"iterations": 3}} (values read as YAML)."""
    from b2p.params import parse_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise B2PError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            value = parse_yaml(text, what="--set value") if text.strip() else None
        except B2PError:
            value = text  # let the schema say what is wrong with it
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise B2PError(f"--set {item!r}: {p!r} is not a group of settings")
        node[leaf] = value
    return out


def _merge(base: dict, layer: Mapping, origin: str, origins: dict[str, str], prefix: str = "") -> None:
    for k, v in layer.items():
        k = str(k).replace("-", "_")
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v, origin, origins, f"{prefix}{k}.")
        else:
            base[k] = dict(v) if isinstance(v, Mapping) else v
            origins[f"{prefix}{k}"] = origin
            if isinstance(v, Mapping):
                for sub in v:
                    origins[f"{prefix}{k}.{sub}"] = origin


def _origin_of(key: str, origins: Mapping[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    return "default"


def _describe(err: dict, model: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        field = str(err["loc"][-1])
        known = list(model.model_fields) if len(err["loc"]) == 1 else []
        close = difflib.get_close_matches(field, known, n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] not in ("missing",) and "input" in err and not msg.endswith(repr(err["input"])):
        msg += f", got {err['input']!r}"
    return msg


def validate(stage: str, values: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> BaseModel:
    """Check `values` against the stage's schema; one B2PError listing every problem, each naming where
    the key was set (`params.yaml: train.lr: ...`)."""
    model = schema(stage)
    try:
        return model.model_validate(dict(values))
    except ValidationError as e:
        origins = origins or {}
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            if key:
                lines.append(f"{_origin_of(key, origins)}: {stage}.{key}: {_describe(err, model)}")
            else:  # a rule over several keys: name everywhere they were set
                where = ", ".join(dict.fromkeys(origins.values())) or "defaults"
                lines.append(f"{where}: {stage}: {err['msg'].removeprefix('Value error, ')}")
        if len(lines) == 1:
            raise B2PError(f"invalid parameter {lines[0]}") from None
        raise B2PError(f"{len(lines)} invalid parameters:\n  " + "\n  ".join(lines)) from None


def student_variant(files: Sequence[str | Path | None], name: str, stage: str) -> list[tuple[dict[str, Any], str]]:
    """The `stage` overrides ("train" or "predict") of student variant `name`: `students.<name>.<stage>` of
    each params file that defines the variant, as (overrides, origin) layers. A name no file defines is an
    error that lists the variants there are."""
    from b2p.params import read_params_section

    layers, seen = [], []
    for f in files:
        if f is None:
            continue
        variants = read_params_section(f, "students")
        seen += list(variants)
        if name not in variants:
            continue
        v = variants[name] if variants[name] is not None else {}
        if not isinstance(v, Mapping) or set(v) - set(VARIANT_SECTIONS):
            raise B2PError(f"students.{name} must be a mapping with the sections {list(VARIANT_SECTIONS)}, got {v!r}", f)
        layer = v.get(stage) or {}
        if not isinstance(layer, Mapping):
            raise B2PError(f"students.{name}.{stage} must be a mapping of `{stage}:` keys, got {layer!r}", f)
        layers.append((dict(layer), f"{f} (students.{name})"))
    if not layers and not any(name in read_params_section(f, "students") for f in files if f is not None):
        close = difflib.get_close_matches(name, seen, n=1)
        raise B2PError(f"no student variant {name!r} under `students:`" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + (f"; variants: {', '.join(dict.fromkeys(seen))}" if seen else ""), next((f for f in files if f is not None), None))
    return layers


VARIANT_SECTIONS = ("train", "predict")  # what a student variant may override (students.<name>.<section>)


def resolve(
    stage: str,
    files: Sequence[str | Path | None] | str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    sets: Sequence[str] | None = None,
    section: str | None = None,
    flags: Mapping[str, str] | None = None,
    student: str | None = None,
) -> BaseModel:
    """The stage's settings: schema defaults < each params file's section (later files win) < the student
    variant's overrides (`students.<student>.<stage>`) < command-line options that were given (None = not
    given) < `--set KEY=VALUE` items. Returns the validated model.

    `options` maps keys (dotted for nested groups) to option values; `flags` names the option of a key
    whose flag is not `--key-with-dashes`, so an error can name what the user typed."""
    from b2p.params import read_params_section

    if files is None or isinstance(files, str | Path):
        files = [files]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for f in files:
        if f is not None:
            _merge(values, read_params_section(f, section or stage), str(f), origins)
    if student is not None:
        for layer, origin in student_variant(files, student, stage):
            _merge(values, layer, origin, origins)
    for key, value in (options or {}).items():  # dotted keys reach nested groups ("grabcut.iterations")
        if value is None or (isinstance(value, Mapping) and not _drop_none(dict(value))):
            continue
        flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
        *parents, leaf = key.split(".")
        layer: dict[str, Any] = {leaf: _drop_none(dict(value)) if isinstance(value, Mapping) else value}
        for p in reversed(parents):
            layer = {p: layer}
        _merge(values, layer, f"{COMMAND_LINE} {flag}", origins)
    for item in sets or []:
        _merge(values, parse_sets([item]), f"{COMMAND_LINE} --set {item}", origins)
    return validate(stage, values, origins)


def check_params_file(path: str | Path, stages: Sequence[str] = STAGES) -> dict[str, BaseModel]:
    """Validate every typed section a params file holds (an unknown section is refused, the pipelines' own
    sections are left to their readers).

    For the suite and CI: one B2PError listing every problem of every section, naming the file."""
    from b2p.params import read_params_section

    found: dict[str, BaseModel] = {}
    problems: list[str] = []
    for stage in stages:
        section = read_params_section(path, stage)
        if not section:
            continue
        try:
            found[stage] = validate(stage, section, {k: str(path) for k in section})
        except B2PError as e:
            problems += [line.strip() for line in str(e).splitlines()[1:]] or [str(e).removeprefix("invalid parameter ")]
    if problems:
        raise B2PError(f"{len(problems)} invalid parameter(s):\n  " + "\n  ".join(problems))
    return found


def _drop_none(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def check_finite(value: float, what: str) -> float:
    """For a lone numeric option outside any schema (NaN passes every `<` / `>` check)."""
    if not math.isfinite(value):
        raise B2PError(f"{what} must be a finite number, got {value}")
    return value


# --- using the result --------------------------------------------------------------------------------------


def train_params(
    files: Sequence[str | Path] | None, options: Mapping[str, Any] | None = None, sets: Sequence[str] | None = None, student: str | None = None
):
    """`TrainParams` (b2p.student.train) from params files, a student variant, CLI options and --set items, validated."""
    m = resolve("train", list(files or []), options, sets, student=student)
    return _attr(TRAIN_PARAMS)(**dict(m))


def teach_config(
    file: str | Path | None,
    options: Mapping[str, Any] | None = None,
    sets: Sequence[str] | None = None,
    flags: Mapping[str, str] | None = None,
):
    """`TeachConfig` (b2p.teach.config) from a params file, CLI options and --set items, validated."""
    m = resolve("teach", file, options, sets, flags=flags)
    d = dict(m)
    d["grabcut"] = m.grabcut.model_dump()
    return _attr("b2p.teach.config.TeachConfig")(**d)
