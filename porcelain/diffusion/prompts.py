"""Prompt vocabularies: labels ``{task: value}`` to text prompts.

A vocabulary is a YAML file::

    template: "{dynasty} dynasty, {kiln} kiln, Chinese porcelain, {type}, {glaze}"
    negative_prompt: "blurry, low quality, text, watermark"
    descriptors:                       # {task: {label value: descriptor}}
      glaze:
        celadon: "celadon glaze, jade green with fine crackle"
    templates:                         # optional: one template per adapter, stressing its tasks
      form: "a Chinese porcelain {type} with {glaze}, studio photograph"
    class_token_template: "{token} {descriptor}"   # optional: how a class token enters the prompt

Each ``{field}`` of a template names a task. A label value missing from ``descriptors`` falls back
to the value with underscores turned into spaces (``copper_red`` → ``copper red``). With class
tokens (textual inversion or DreamBooth) each field is rendered through ``class_token_template``,
where ``{token}`` is the class token of that label value (:func:`class_token`), ``{descriptor}``
its descriptor, ``{value}`` the raw label value and ``{task}`` the task.

Built-in vocabularies live in ``porcelain/configs/prompts/<name>.yaml`` (``sample``, ``digits``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from porcelain.errors import ConfigError
from porcelain.hashing import stable_hash

__all__ = [
    "BUILTIN_DIR",
    "ClassTokenMode",
    "Vocabulary",
    "class_token",
    "descriptor",
    "load_vocabulary",
    "missing_descriptors",
    "prompt_for",
    "template_fields",
    "vocabulary_hash",
]

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"
ClassTokenMode = Literal["none", "textual_inversion", "dreambooth"]
_TOKEN_SAFE = re.compile(r"[^a-z0-9]+")


class Vocabulary(BaseModel):
    """A parsed prompt vocabulary (see the module docstring for the YAML format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(description="Prompt template; each {field} names a task.")
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    descriptors: dict[str, dict[str, str]] = Field(default_factory=dict, description=(
        "{task: {label value: descriptor}}; values not listed fall back to the value with '_' → ' '."))
    templates: dict[str, str] = Field(default_factory=dict, description=(
        "Per-adapter templates {adapter name: template}, stressing that adapter's tasks."))
    class_token_template: str = Field("{token} {descriptor}", description=(
        "How a class token enters a prompt; fields {token}, {descriptor}, {value}, {task}."))

    @model_validator(mode="before")
    @classmethod
    def _stringify(cls, data: object) -> object:
        # YAML reads the digits' label values (0..9) as ints: descriptors are keyed by strings.
        if isinstance(data, dict) and isinstance(data.get("descriptors"), dict):
            data = dict(data)
            data["descriptors"] = {
                str(task): {str(k): v for k, v in (values or {}).items()}
                for task, values in data["descriptors"].items()
            }
        return data

    @model_validator(mode="after")
    def _check_templates(self) -> "Vocabulary":
        template_fields(self.template, "template")
        for name, t in self.templates.items():
            template_fields(t, f"templates.{name}")
        bad = set(template_fields(self.class_token_template, "class_token_template")) - {
            "token", "descriptor", "value", "task"}
        if bad:
            raise ValueError(f"class_token_template: unknown fields {sorted(bad)} "
                             "(allowed: token, descriptor, value, task)")
        return self


def template_fields(template: str, where: str = "template") -> list[str]:
    """The ``{field}`` names of a template, in order, without repeats; a malformed one is a ConfigError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{where}: malformed template {template!r} ({e})") from None
    out: list[str] = []
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if not field or not field.isidentifier() or spec or conv:
            raise ConfigError(f"{where}: template fields must be plain task names like {{glaze}}, "
                              f"got {{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                              f"in {template!r}")
        if field not in out:
            out.append(field)
    return out


def load_vocabulary(name_or_path: str) -> Vocabulary:
    """A built-in vocabulary by name (``sample``, ``digits``) or a YAML file by path."""
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if re.fullmatch(r"[A-Za-z0-9_\-]+", name_or_path) and builtin.is_file():
        path = builtin
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
            raise ConfigError(f"prompts.vocabulary: {name_or_path!r} is neither a built-in vocabulary "
                              f"({', '.join(names)}) nor a YAML file (looked at {path.resolve()})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"prompts.vocabulary: {path} is not valid YAML ({e})") from None
    try:
        return Vocabulary.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"prompts.vocabulary {path}:\n  " + "\n  ".join(lines)) from None
    except ConfigError as e:
        raise ConfigError(f"prompts.vocabulary {path}: {e}") from None


def vocabulary_hash(vocab: Vocabulary) -> str:
    """Content hash of a vocabulary (not of its file name)."""
    return stable_hash(vocab.model_dump(mode="json"))


def descriptor(vocab: Vocabulary, task: str, value: str) -> str:
    """The descriptor of one label value, or the value with underscores as spaces."""
    return vocab.descriptors.get(task, {}).get(str(value), str(value).replace("_", " "))


def class_token(task: str, value: str) -> str:
    """The class token of a label value: ``<glaze_moon_white>`` (lower case, ``[a-z0-9_]`` only).

    With textual inversion it is added to the tokenizer as one new token; with DreamBooth it stays
    plain text and is tokenized into existing BPE pieces, the rare identifier of that value.
    """
    t = _TOKEN_SAFE.sub("_", str(task).lower()).strip("_")
    v = _TOKEN_SAFE.sub("_", str(value).lower()).strip("_")
    return f"<{t}_{v}>"


def prompt_for(
    labels: Mapping[str, str],
    vocab: Vocabulary,
    *,
    template: str | None = None,
    adapter: str | None = None,
    class_tokens: ClassTokenMode = "none",
) -> str:
    """Fill a template with the descriptors of ``labels``.

    The template is ``template`` if given, else the vocabulary's template of ``adapter`` if it has
    one, else the vocabulary's ``template``. A field naming a task absent from ``labels`` is a
    :class:`ConfigError` naming it; label tasks the template does not name are left out.
    """
    if template is None:
        template = vocab.templates.get(adapter, vocab.template) if adapter else vocab.template
    fields = template_fields(template)
    missing = [f for f in fields if f not in labels]
    if missing:
        raise ConfigError(f"prompt template {template!r} names task(s) {missing} that the labels do not have "
                          f"(labels have: {sorted(labels)})")
    values: dict[str, str] = {}
    for task in fields:
        value = str(labels[task])
        text = descriptor(vocab, task, value)
        if class_tokens != "none":
            text = vocab.class_token_template.format(
                token=class_token(task, value), descriptor=text, value=value, task=task)
        values[task] = text
    return _tidy(template.format(**values))


def _tidy(text: str) -> str:
    """Collapse runs of spaces and stray spaces before commas (an empty descriptor leaves them)."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip()


def missing_descriptors(vocab: Vocabulary, classes: Mapping[str, Sequence[str]]) -> list[str]:
    """``task=value`` pairs of ``classes`` with no explicit descriptor (they would use the fallback)."""
    return [f"{task}={value}" for task, values in classes.items() for value in values
            if str(value) not in vocab.descriptors.get(task, {})]
