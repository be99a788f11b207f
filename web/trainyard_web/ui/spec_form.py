"""The launch form, generated from the job spec's JSON schema: the same fields, defaults and bounds the API
accepts, and the same validation (errors come back keyed by the same field paths)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from trainyard.ml.architectures import ARCHITECTURES
from trainyard.ml.optim import OPTIMIZERS, SCHEDULERS
from trainyard.ml.transforms import AUGMENTATIONS
from trainyard.specs import JobSpec, Resources, TrainParams

# Which spec fields the launch form shows, in order. Everything under params is shown.
TOP_FIELDS = ["name", "dataset", "architecture", "architecture_options", "weights_path", "model_name", "register"]
TAIL_FIELDS = [("resources", Resources, "queue"), ("resources", Resources, "gpus"), (None, JobSpec, "priority"),
               (None, JobSpec, "max_attempts")]
REGISTRY_CHOICES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "augmentation": AUGMENTATIONS}


@dataclass
class FormField:
    name: str  # the spec path, e.g. "params.epochs": also the input's name and the error's key
    label: str
    kind: str  # number, select, checkbox, text, json
    default: Any = None
    value: Any = None
    required: bool = False
    help: str = ""
    choices: list[tuple[str, str]] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    integer: bool = False
    error: str | None = None
    group: str = "job"

    @property
    def input_id(self) -> str:
        return "field-" + self.name.replace(".", "-")

    @property
    def bounds(self) -> str:
        low = (">" if self.exclusive_minimum else "≥") + f" {self._number(self.minimum)}" if self.minimum is not None else ""
        high = ("<" if self.exclusive_maximum else "≤") + f" {self._number(self.maximum)}" if self.maximum is not None else ""
        return ", ".join(p for p in (low, high) if p)

    def _number(self, value: float) -> str:
        return f"{int(value):,}" if self.integer else f"{value:g}"

    @property
    def step(self) -> str:
        return "1" if self.integer else "any"


def _from_schema(name: str, prop: dict[str, Any], group: str) -> FormField:
    options = prop.get("anyOf", [prop])
    typed = next((o for o in options if o.get("type") != "null"), prop)
    optional = any(o.get("type") == "null" for o in options)
    kind = {"integer": "number", "number": "number", "boolean": "checkbox", "object": "json"}.get(
        typed.get("type", "string"), "text")
    short = name.rsplit(".", 1)[-1]
    form_field = FormField(
        name=name, label=prop.get("title", short), kind=kind, default=prop.get("default"),
        help=prop.get("description", ""), required=not optional and "default" not in prop,
        integer=typed.get("type") == "integer", group=group,
        minimum=typed.get("minimum", typed.get("exclusiveMinimum")),
        maximum=typed.get("maximum", typed.get("exclusiveMaximum")),
        exclusive_minimum="exclusiveMinimum" in typed, exclusive_maximum="exclusiveMaximum" in typed,
    )
    if short in REGISTRY_CHOICES:
        form_field.kind = "select"
        form_field.choices = [(e.name, f"{e.name} — {e.description}" if e.description else e.name)
                              for e in REGISTRY_CHOICES[short]]
    elif "enum" in typed:
        form_field.kind = "select"
        form_field.choices = [(v, v) for v in typed["enum"]]
    return form_field


def _properties(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()["properties"]


def launch_fields(datasets: list[Any], task: str | None) -> list[FormField]:
    """Every field of the launch form, with defaults; architectures limited to those fitting `task`."""
    spec_props = _properties(JobSpec)
    fields = [_from_schema(name, spec_props[name], "job") for name in TOP_FIELDS]
    by_name = {f.name: f for f in fields}
    by_name["dataset"].kind, by_name["dataset"].required = "select", True
    by_name["dataset"].choices = [(d.name, f"{d.name} ({d.task}, {d.num_samples} images, {d.num_classes} classes)")
                                  for d in datasets]
    by_name["architecture"].kind, by_name["architecture"].required = "select", True
    by_name["architecture"].choices = architecture_choices(task)
    by_name["architecture_options"].default, by_name["architecture_options"].required = {}, False
    fields += [_from_schema(f"params.{name}", prop, "params") for name, prop in _properties(TrainParams).items()]
    for prefix, model, name in TAIL_FIELDS:
        path = f"{prefix}.{name}" if prefix else name
        fields.append(_from_schema(path, _properties(model)[name], "resources"))
    for f in fields:
        f.value = f.default
    return fields


def architecture_choices(task: str | None) -> list[tuple[str, str]]:
    return [(a.name, f"{a.name} — {a.description}") for a in ARCHITECTURES if task is None or a.obj.task == task]


def fill(fields: list[FormField], values: dict[str, Any]) -> None:
    """Put a flat {path: value} mapping (a submitted form, or a cloned job's spec) into the fields."""
    for f in fields:
        if f.name in values:
            f.value = values[f.name]


def flatten_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("params", "resources"):
            flat.update(flatten_spec(value, path + "."))
        else:
            flat[path] = value
    return flat


def parse(fields: list[FormField], form: Any) -> tuple[JobSpec | None, dict[str, str]]:
    """The submitted form as a checked JobSpec, or the errors keyed by field path."""
    data: dict[str, Any] = {"kind": "train"}
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for f in fields:
        if f.kind == "checkbox":
            raw: Any = f.name in form
        else:
            raw = form.get(f.name, "")
            raw = raw.strip() if isinstance(raw, str) else raw
        values[f.name] = raw
        if f.kind == "json":
            try:
                raw = json.loads(raw) if raw else {}
            except ValueError as exc:
                errors[f.name] = f"not valid JSON: {exc}"
                continue
        elif raw == "" and not f.required:
            continue  # left empty: the spec's default applies
        _put(data, f.name, raw)
    fill(fields, values)
    if errors:
        return None, errors
    try:
        return JobSpec.model_validate(data), {}
    except ValidationError as exc:
        for error in exc.errors():
            path = ".".join(str(p) for p in error["loc"])
            errors.setdefault(path, error["msg"].removeprefix("Value error, "))
        return None, errors


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def attach_errors(fields: list[FormField], errors: dict[str, str]) -> list[str]:
    """Put each error beside its field; returns the ones no field shows (to show above the form)."""
    by_name = {f.name: f for f in fields}
    unplaced = []
    for path, message in errors.items():
        target = by_name.get(path) or next((f for f in fields if path.startswith(f.name + ".")), None)
        if target is not None:
            target.error = message if target.error is None else f"{target.error}; {message}"
        else:
            unplaced.append(f"{path}: {message}" if path not in ("(body)", "") else message)
    return unplaced
