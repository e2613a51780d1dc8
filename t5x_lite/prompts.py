"""Prompt templates: promptsource-style YAML files of Jinja templates, rendered in a sandbox.

A template file holds one dataset's templates (promptsource's layout; the `!Template` / `!TemplateMetadata` tags
are optional):

    dataset: super_glue
    subset: rte
    templates:
      8fb1c6aa-20e9-438c-bece-c6af1c746449: !Template
        id: 8fb1c6aa-20e9-438c-bece-c6af1c746449
        name: does it follow that
        jinja: '{{ premise }} Does it follow that {{ hypothesis }}? Yes or no? ||| {{ answer_choices[label] }}'
        answer_choices: Yes ||| No
        metadata: !TemplateMetadata
          original_task: true
          choices_in_prompt: true
          metrics: [Accuracy]

promptsource's conventions hold: `|||` separates the prompt from the target (and one answer choice from the next);
a `|||` inside an example's value does not split; every `{{ ... }}` value is cut to `max_variable_length` (2048)
characters at a word boundary (Jinja's `truncate`); the `choice` filter (random.choice) and `most_frequent` filter
and the `zip` global exist; `answer_choices` is a variable of the prompt. Randomness is seeded by the template's id
and the example's index, so a rendering is reproducible and does not depend on the order examples are rendered in.

Templates come from users and third parties, so they are untrusted: they run in Jinja's immutable sandbox, a
template that names an attribute starting with `_` (`''.__class__`, `x.__globals__`) is refused when it is loaded,
and any other reach for Python internals is refused when it runs (TemplateSecurityError). An undefined variable is
an error, not an empty string. A template whose target is not one of its answer choices is an error: a template
that needs label words in its prompt but generates something else writes them inline (`["no", "yes"][label]`).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import random
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import jinja2
import yaml
from jinja2 import nodes, sandbox

SEPARATOR = "|||"
# Stands in for a `|||` inside an example's value while the rendering is split on the separator.
_PIPE_PROTECTOR = "\x00t5x_lite_pipe\x00"
TEMPLATE_KEYS = ("id", "name", "jinja", "answer_choices", "metadata", "reference")
METADATA_KEYS = ("original_task", "choices_in_prompt", "metrics", "languages")


class TemplateError(ValueError):
    """A template file or template that cannot be used; the message names the file, line and template."""


class TemplateRenderError(TemplateError):
    """A template that fails on an example (a missing field, a wrong type, a target outside the answer choices)."""


class TemplateSecurityError(TemplateError):
    """A template that reaches for Python internals, which the sandbox refuses."""


@dataclasses.dataclass(frozen=True)
class TemplateMetadata:
    original_task: bool | None = None  # the template poses the dataset's own task (T0 evaluates only these)
    choices_in_prompt: bool | None = None  # the prompt lists the answer choices
    metrics: tuple[str, ...] = ()  # promptsource's metric names, e.g. ("Accuracy",)
    languages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Prompted:
    """One example rendered by a template."""

    inputs: str
    targets: str
    answer_choices: tuple[str, ...] | None  # None: the template has no answer choices


def most_frequent(items: Iterable[Any]) -> list[Any]:
    """promptsource's `most_frequent` filter: the items that occur most often, in order of first occurrence
    (an empty list for no items)."""
    counts = collections.Counter(items)
    if not counts:
        return []
    top = max(counts.values())
    return [item for item, count in counts.items() if count == top]


def _protect_pipes(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PIPE_PROTECTOR)
    if isinstance(value, Mapping):
        return {key: _protect_pipes(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protect_pipes(item) for item in value]
    return value


def _split(rendered: str) -> list[str]:
    """The parts between separators, stripped; a protected '|||' stays protected."""
    return [part.strip() for part in rendered.split(SEPARATOR)]


def _restore_pipes(parts: Sequence[str]) -> tuple[str, ...]:
    return tuple(part.replace(_PIPE_PROTECTOR, SEPARATOR) for part in parts)


def _internal_names(source: str, environment: jinja2.Environment) -> list[tuple[int, str]]:
    """(line, name) of every attribute or constant subscript starting with `_` in a template's source."""
    found = []
    for node in environment.parse(source).find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        else:
            continue
        if name.startswith("_"):
            found.append((node.lineno, name))
    return found


class Template:
    """One prompt template: `render` turns an example (a mapping of field -> value) into a `Prompted`.

    Args:
      id, name: promptsource's identifiers; `name` also names the template's seqio task.
      jinja: `prompt ||| target`.
      answer_choices: fixed (`Yes ||| No`) or per example (`{{ choice1 }} ||| {{ choice2 }}`); None for none.
      metadata: see `TemplateMetadata`.
      reference: promptsource's free-text note.
      where: the template's place in its file (`path:line`), for error messages.
      max_variable_length: characters each `{{ ... }}` value is cut to.

    Rendering is not thread-safe (the `choice` filter's generator is reseeded for every example).
    """

    def __init__(self, *, id: str, name: str, jinja: str, answer_choices: str | None = None,
                 metadata: TemplateMetadata = TemplateMetadata(), reference: str = "", where: str = "<string>",
                 max_variable_length: int = 2048):
        self.id, self.name, self.jinja, self.answer_choices = id, name, jinja, answer_choices
        self.metadata, self.reference, self.where = metadata, reference, where
        self._random = random.Random()
        self._seed: str | None = None  # the example's seed, until the `choice` filter first draws from it
        self._environment = sandbox.ImmutableSandboxedEnvironment(
            undefined=jinja2.StrictUndefined,
            finalize=lambda value: jinja2.filters.do_truncate(self._environment, str(value), max_variable_length),
        )
        # pass_context keeps Jinja from folding `['a', 'b'] | choice` into one constant when it compiles the template.
        self._environment.filters["choice"] = jinja2.pass_context(lambda _, items: self._draw().choice(list(items)))
        self._environment.filters["most_frequent"] = most_frequent
        self._environment.globals["zip"] = zip
        if SEPARATOR not in jinja:
            raise TemplateError(f"{self._describe()}: its jinja has no '{SEPARATOR}' between the prompt and the target")
        self._prompt = self._compile(jinja, "jinja")
        self._choices = None if answer_choices is None else self._compile(answer_choices, "answer_choices")
        # Fixed answer choices (no Jinja markup) are split once, not rendered per example.
        self._fixed_choices = None
        if answer_choices is not None and not re.search(r"\{[{%#]", answer_choices):
            self._fixed_choices = _split(answer_choices)

    def _describe(self) -> str:
        return f"{self.where}: template {self.name!r} (id {self.id})"

    def _compile(self, source: str, key: str) -> jinja2.Template:
        try:
            internals = _internal_names(source, self._environment)
            compiled = self._environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise TemplateError(f"{self._describe()}: line {error.lineno} of its {key}: {error.message}") from error
        if internals:
            names = ", ".join(repr(name) for name in sorted({name for _, name in internals}))
            raise TemplateSecurityError(
                f"{self._describe()}: line {min(line for line, _ in internals)} of its {key} reaches for {names}; "
                "names starting with '_' are Python internals, which templates may not use")
        return compiled

    def _draw(self) -> random.Random:
        """The generator of the example being rendered, seeded when first used (seeding costs as much as a
        rendering, and most templates never draw)."""
        if self._seed is not None:
            self._random.seed(self._seed)
            self._seed = None
        return self._random

    def render(self, example: Mapping[str, Any], index: int) -> Prompted | None:
        """The example as (inputs, targets, answer choices); None when the template renders an empty prompt or
        target, promptsource's way of skipping an example (e.g. `{% if label != -1 %}...{% endif %}`).

        Args:
          example: the example's fields.
          index: the example's index in its split; with the template's id it seeds the `choice` filter.

        Raises:
          TemplateRenderError: the template fails on the example, renders more than one '|||', or renders a
            target that is not one of its answer choices.
          TemplateSecurityError: the template reaches for Python internals.
        """
        if "answer_choices" in example:
            raise TemplateRenderError(f"{self._describe()}: example {index} has a field 'answer_choices', which "
                                      "templates reserve for the template's answer choices")
        variables = _protect_pipes(example)
        self._seed = f"{self.id}/{index}"
        try:
            # The prompt sees the choices with their values' '|||' still protected.
            choices = self._fixed_choices
            if choices is None and self._choices is not None:
                choices = _split(self._choices.render(variables))
            parts = _restore_pipes(_split(self._prompt.render({**variables, "answer_choices": choices})))
        except jinja2.exceptions.SecurityError as error:
            raise TemplateSecurityError(f"{self._describe()} reaches for Python internals on example {index}, "
                                        f"which the sandbox refuses: {error}") from error
        except Exception as error:  # noqa: BLE001  (whatever a template raises, name the template and the example)
            raise TemplateRenderError(f"{self._describe()} failed on example {index}: {type(error).__name__}: "
                                      f"{error}") from error
        if len(parts) > 2:
            raise TemplateRenderError(f"{self._describe()} rendered {len(parts) - 1} '{SEPARATOR}' separators on "
                                      f"example {index}; expected one, between the prompt and the target")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            return None
        inputs, targets = parts
        if choices is None:
            return Prompted(inputs, targets, None)
        choices = _restore_pipes(choices)
        if targets not in choices:
            raise TemplateRenderError(f"{self._describe()}: on example {index} the target {targets!r} is not one "
                                      f"of the answer choices {list(choices)}")
        return Prompted(inputs, targets, choices)


@dataclasses.dataclass(frozen=True)
class TemplateCollection:
    """The templates of one file, in file order."""

    dataset: str
    subset: str | None
    templates: tuple[Template, ...]
    path: str

    def __getitem__(self, name: str) -> Template:
        for template in self.templates:
            if template.name == name:
                return template
        raise KeyError(f"{self.path} has no template {name!r}; its templates: {[t.name for t in self.templates]}")


# ---- the YAML file -------------------------------------------------------------------------------------------


class _Located(dict):
    """A YAML mapping that remembers the line it starts on and the line of each key."""

    line: int
    key_lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no Python objects) that reads promptsource's tags as plain mappings and refuses
    duplicate keys."""


def _construct_located(loader: _Loader, node: yaml.MappingNode) -> _Located:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, f"expected a mapping after {node.tag}", node.start_mark)
    loader.flatten_mapping(node)
    mapping = _Located()
    mapping.line, mapping.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


for _tag in ("tag:yaml.org,2002:map", "!Template", "!TemplateMetadata"):
    _Loader.add_constructor(_tag, _construct_located)


def _checked_keys(mapping: Any, allowed: Sequence[str], path: str, line: int, what: str) -> _Located:
    """`mapping` (which YAML gave at `line`), after checking it is a mapping of known keys."""
    if not isinstance(mapping, _Located):
        raise TemplateError(f"{path}:{line}: {what} is not a mapping: {mapping!r}")
    for key in mapping:
        if key not in allowed:
            raise TemplateError(f"{path}:{mapping.key_lines[key]}: {what} has an unknown key {key!r}; valid keys: "
                                f"{list(allowed)}")
    return mapping


def _typed(mapping: _Located, key: str, types: tuple[type, ...], path: str, what: str) -> Any:
    """mapping[key] (None when absent), after checking its type."""
    value = mapping.get(key)
    if not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise TemplateError(f"{path}:{mapping.key_lines.get(key, mapping.line)}: {what}: {key!r} must be {names}, "
                            f"got {value!r}")
    return value


def _metadata(mapping: Any, path: str, line: int, what: str) -> TemplateMetadata:
    if mapping is None:
        return TemplateMetadata()
    what = f"{what}'s metadata"
    mapping = _checked_keys(mapping, METADATA_KEYS, path, line, what)
    lists = {}
    for key in ("metrics", "languages"):
        values = _typed(mapping, key, (list, type(None)), path, what) or []
        if not all(isinstance(value, str) for value in values):
            raise TemplateError(f"{path}:{mapping.key_lines[key]}: {what}: {key!r} must be a list of strings, got "
                                f"{values!r}")
        lists[key] = tuple(values)
    return TemplateMetadata(original_task=_typed(mapping, "original_task", (bool, type(None)), path, what),
                            choices_in_prompt=_typed(mapping, "choices_in_prompt", (bool, type(None)), path, what),
                            **lists)


def parse_templates(text: str, path: str = "<string>", max_variable_length: int = 2048) -> TemplateCollection:
    """The templates of a promptsource-style YAML document; `path` names it in errors.

    Raises:
      TemplateError: bad YAML, a missing or unknown key, a value of the wrong type, an id that differs from its
        key, two templates with one name, a template without '|||' or with a Jinja syntax error (the message
        names the file and line).
      TemplateSecurityError: a template names an attribute that starts with '_'.
    """
    stream = io.StringIO(text)
    stream.name = path  # YAML's errors name the stream
    try:
        document = yaml.load(stream, Loader=_Loader)
    except yaml.YAMLError as error:
        raise TemplateError(f"{path}: not a template file: {error}") from error
    document = _checked_keys(document, ("dataset", "subset", "templates"), path, 1, "the file")
    dataset = _typed(document, "dataset", (str,), path, "the file")
    subset = _typed(document, "subset", (str, type(None)), path, "the file")
    entries = _typed(document, "templates", (dict,), path, "the file")
    if not entries:
        raise TemplateError(f"{path}:{document.key_lines['templates']}: no templates")
    templates, lines_of_names = [], {}
    for key, entry in entries.items():
        line = entries.key_lines[key]
        entry = _checked_keys(entry, TEMPLATE_KEYS, path, line, f"template {key!r}")
        for required in ("id", "name", "jinja"):
            if required not in entry:
                raise TemplateError(f"{path}:{line}: template {key!r} has no {required!r}")
        name = _typed(entry, "name", (str,), path, f"template {key!r}")
        what = f"template {name!r}"
        if _typed(entry, "id", (str,), path, what) != str(key):
            raise TemplateError(f"{path}:{entry.key_lines['id']}: {what}: its id {entry['id']!r} differs from its "
                                f"key {key!r}")
        if name in lines_of_names:
            raise TemplateError(f"{path}:{line}: two templates are named {name!r} (the other at line "
                                f"{lines_of_names[name]})")
        lines_of_names[name] = line
        templates.append(Template(
            id=entry["id"], name=name, jinja=_typed(entry, "jinja", (str,), path, what),
            answer_choices=_typed(entry, "answer_choices", (str, type(None)), path, what),
            metadata=_metadata(entry.get("metadata"), path, entry.key_lines.get("metadata", line), what),
            reference=_typed(entry, "reference", (str, type(None)), path, what) or "",
            where=f"{path}:{line}", max_variable_length=max_variable_length,
        ))
    return TemplateCollection(dataset, subset, tuple(templates), path)


def load_templates(path: str, max_variable_length: int = 2048) -> TemplateCollection:
    """The templates of a YAML file (see `parse_templates`)."""
    with open(path, encoding="utf-8") as f:
        return parse_templates(f.read(), path, max_variable_length)


def clean_task_name(name: str) -> str:
    """A task name cleaned as T0 cleans `<dataset>_<subset>_<template name>` (t-zero's t0/seqio_tasks/utils.py,
    `task_clean`): each run of characters other than letters, digits, '_' and '.' becomes one '_', and nothing is
    stripped: 'super_glue_rte_GPT-3 style' -> 'super_glue_rte_GPT_3_style', 'trec_what type?' -> 'trec_what_type_'."""
    return re.sub(r"[^\w.]+", "_", name)  # T0's [^\w\d\._]: \w has the digits and '_
