"""Semantic-function templates: text, `{{input}}` references, `{{gen out ...}}` and roles.

One syntax, read from the docstring:
- `{{question}}` inserts an input (a parameter of the function);
- `{{gen answer max_tokens=64 stop="\\n" temperature=0.7}}` marks a generated output;
  `choices="yes|no"` restricts it to one of those strings, scored as whole options
  (`choice_scoring=auto|whole|trie`, `length_normalize=true|false`; see
  covey/llm_backend/option_scoring.py);
  `token_healing=true|false` backs the prompt up one token at the gen (default: on when the
  text right before the gen ends in a space or tab, see covey/llm_backend/token_healing.py);
- `{{call calculator expression=expr}}` calls a tool of the semantic function (declared
  with `calls=[...]`) between two gens, its arguments named inputs or earlier outputs; its
  result text goes into the prompt there and the next gen continues on the same context;
- `{{#system}}`, `{{#user}}`, `{{#assistant}}` start a chat message, so the runtime can render
  the model's chat template; a template without roles is a plain completion prompt.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
from dataclasses import dataclass
from typing import Literal

from covey.errors import InvalidRequestError, TemplateError
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.tokenizer import CHAT_ROLES

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = CHAT_ROLES
_TAG = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GEN_OPTIONS = (
    "max_tokens",
    "top_k",
    "seed",
    "temperature",
    "top_p",
    "stop",
    "choices",
    "choice_scoring",
    "length_normalize",
    "token_healing",
)
_BOOLS = {"true": True, "false": False}


@dataclass(frozen=True)
class Text:
    text: str
    role: Role | None = None


@dataclass(frozen=True)
class Ref:
    """An input placeholder; `name` is a parameter of the semantic function."""

    name: str
    role: Role | None = None


@dataclass(frozen=True)
class Gen:
    """A generated output; `choices` (when set) constrains it to one of the strings."""

    name: str
    params: SamplingParams
    choices: tuple[str, ...] | None = None
    role: Role | None = None
    explicit_healing: bool = False  # the gen set token_healing= itself


@dataclass(frozen=True)
class Call:
    """A tool call between gens: `args` pairs each tool parameter (None: the only one) with
    the input or earlier output that fills it."""

    tool: str
    args: tuple[tuple[str | None, str], ...]
    role: Role | None = None


Part = Text | Ref | Gen | Call


@dataclass(frozen=True)
class Template:
    parts: tuple[Part, ...]
    uses_roles: bool

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, Ref)))

    @property
    def gens(self) -> tuple[Gen, ...]:
        return tuple(p for p in self.parts if isinstance(p, Gen))

    @property
    def calls(self) -> tuple[Call, ...]:
        return tuple(p for p in self.parts if isinstance(p, Call))


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """`; did you mean 'x'?` for the closest option, or nothing (also for a non-string)."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace("\\t", "\t")


def _value(text: str) -> int | float | str | bool:
    """What an option's text denotes: true/false, else an integer, else a number, else the
    text itself.

    Only the reading happens here; whether the value fits its option (type, range, finite)
    is checked by constructing `SamplingParams`, the one place those rules live.
    """
    if text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def _gen(body: str, where: str, defaults: SamplingParams, role: Role | None) -> Gen:
    try:
        words = shlex.split(body)
    except ValueError as e:
        raise TemplateError(f"{where}: cannot parse {{{{gen {body}}}}}: {e}") from None
    if not words or not _NAME.match(words[0]):
        raise TemplateError(
            f"{where}: {{{{gen ...}}}} needs an output name, e.g. {{{{gen answer}}}}"
        )
    name, updates, choices = words[0], {}, None
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in GEN_OPTIONS:
            raise TemplateError(
                f"{where}: unknown option {key!r} in {{{{gen {name}}}}}{suggest(key, GEN_OPTIONS)} "
                f"(options: {', '.join(GEN_OPTIONS)}; write key=value)"
            )
        if key != "stop" and (key in updates or key == "choices" and choices is not None):
            raise TemplateError(
                f"{where}: {{{{gen {name}}}}} sets {key} twice (only stop may repeat)"
            )
        if key == "stop":
            updates["stop"] = (*updates.get("stop", ()), _unescape(value))
        elif key == "choices":
            choices = tuple(value.split("|"))
        else:
            updates[key] = _value(value)
    if choices is not None and len(choices) < 2:
        raise TemplateError(f"{where}: choices of {{{{gen {name}}}}} need two or more options")
    try:
        params = dataclasses.replace(defaults, **updates)
        if choices is not None:  # kept apart from params, but checked by the same rules
            dataclasses.replace(params, choices=choices)
    except InvalidRequestError as e:  # SamplingParams checks every option's type and range
        raise TemplateError(f"{where}: {{{{gen {name}}}}}: {e}") from None
    return Gen(name, params, choices, role, explicit_healing="token_healing" in updates)


def _call(body: str, where: str, role: Role | None) -> Call:
    words = body.split()
    if not words or not _NAME.match(words[0]):
        raise TemplateError(
            f"{where}: {{{{call ...}}}} needs a tool name, e.g. {{{{call calculator expr}}}}"
        )
    args: list[tuple[str | None, str]] = []
    for word in words[1:]:
        key, sep, value = word.partition("=")
        param, ref = (key, value) if sep else (None, key)
        if (param is not None and not _NAME.match(param)) or not _NAME.match(ref):
            raise TemplateError(
                f"{where}: {{{{call {words[0]}}}}}: write arguments as param=name, where name "
                f"is an input or an earlier gen output; got {word!r}"
            )
        args.append((param, ref))
    if sum(p is None for p, _ in args) and len(args) > 1:
        raise TemplateError(
            f"{where}: {{{{call {words[0]}}}}}: name each argument (param=name) when there are "
            "several"
        )
    return Call(words[0], tuple(args), role)


def _tidy(parts: list[Part]) -> tuple[Part, ...]:
    """Drop the newlines that only lay out role markers, and empty text."""
    out: list[Part] = []
    for i, p in enumerate(parts):
        if isinstance(p, Text):
            text = p.text
            if p.role is not None and (i == 0 or parts[i - 1].role != p.role):
                text = text.lstrip("\n")
            if i + 1 < len(parts) and parts[i + 1].role != p.role:
                text = text.rstrip()
            if text:
                out.append(Text(text, p.role))
        else:
            out.append(p)
    return tuple(out)


def parse_template(source: str, where: str, defaults: SamplingParams) -> Template:
    """Split `source` into parts; `where` names the function in error messages."""
    parts: list[Part] = []
    role: Role | None = None
    pos = 0
    for m in _TAG.finditer(source):
        if m.start() > pos:
            parts.append(Text(source[pos : m.start()], role))
        pos = m.end()
        body = m.group(1).strip()
        if body.startswith("#"):
            if body[1:] not in ROLES:
                raise TemplateError(
                    f"{where}: unknown role {{{{{body}}}}}{suggest(body[1:], ROLES)} "
                    f"(roles: {', '.join('#' + r for r in ROLES)})"
                )
            role = body[1:]  # type: ignore[assignment]
        elif body.startswith("gen ") or body == "gen":
            parts.append(_gen(body[3:].strip(), where, defaults, role))
        elif body.startswith("call ") or body == "call":
            parts.append(_call(body[4:].strip(), where, role))
        elif _NAME.match(body):
            parts.append(Ref(body, role))
        else:
            raise TemplateError(f"{where}: {{{{{body}}}}} is not a placeholder name or a gen")
    if pos < len(source):
        parts.append(Text(source[pos:], role))
    return _check(Template(_heal_after_space(_tidy(parts)), role is not None), where)


def _heal_after_space(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    """Token healing for each gen right after text that ends in a space or tab (the
    prompt then ends inside a token), unless the gen says `token_healing=` itself."""
    out = list(parts)
    for i, part in enumerate(out):
        prev = out[i - 1] if i else None
        if (
            isinstance(part, Gen)
            and not part.explicit_healing
            and isinstance(prev, Text)
            and prev.text.endswith((" ", "\t"))
        ):
            out[i] = dataclasses.replace(
                part, params=dataclasses.replace(part.params, token_healing=True)
            )
    return tuple(out)


def _check(template: Template, where: str) -> Template:
    gens = template.gens
    if not gens:
        raise TemplateError(f"{where}: the template has no {{{{gen name}}}}, so it outputs nothing")
    if template.parts[0].role is None and template.uses_roles:
        raise TemplateError(
            f"{where}: text before the first role marker; start with {{{{#system}}}}"
        )
    seen: set[str] = set()
    for g in gens:
        if g.name in seen:
            raise TemplateError(f"{where}: output {g.name!r} is generated twice; rename one")
        seen.add(g.name)
        if template.uses_roles and g.role != "assistant":
            raise TemplateError(
                f"{where}: {{{{gen {g.name}}}}} is in a {g.role} message; "
                "generate only after {{#assistant}}"
            )
    return template
