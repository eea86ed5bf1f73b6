"""Template parsing: parts, roles, gen options, and one test per template error."""

from __future__ import annotations

import pytest

from covey.errors import TemplateError
from covey.graph.template import Gen, Ref, Text, parse_template
from covey.llm_backend.sampling_params import SamplingParams

DEFAULTS = SamplingParams(max_tokens=100, temperature=0.5)


def parse(source: str):
    return parse_template(source, "semantic function 'f'", DEFAULTS)


def test_plain_completion_parts():
    t = parse('Q: {{question}}\nA: {{gen answer max_tokens=8 stop="\\n" top_k=5}}!')
    assert t.parts[0] == Text("Q: ") and t.parts[1] == Ref("question")
    gen = t.parts[3]
    assert isinstance(gen, Gen) and gen.name == "answer"
    assert gen.params.max_tokens == 8 and gen.params.stop == ("\n",) and gen.params.top_k == 5
    assert gen.params.temperature == 0.5  # inherited from the decorator's defaults
    assert t.parts[-1] == Text("!") and not t.uses_roles and t.refs == ("question",)


def test_roles_strip_layout_newlines():
    t = parse("{{#system}}\nBe brief.\n{{#user}}\n{{q}}\n{{#assistant}}\n{{gen a}}")
    assert t.uses_roles
    assert [type(p).__name__ for p in t.parts] == ["Text", "Ref", "Gen"]
    assert t.parts[0] == Text("Be brief.", "system")
    assert t.parts[1].role == "user" and t.parts[2].role == "assistant"


def test_choices_and_repeated_stop():
    gen = parse('{{gen pick choices="yes|no|maybe" stop=. stop=";"}}').gens[0]
    assert gen.choices == ("yes", "no", "maybe") and gen.params.stop == (".", ";")


@pytest.mark.parametrize(
    "source, fragment",
    [
        (
            "{{gen a max_token=3}}",
            "unknown option 'max_token' in {{gen a}}; did you mean 'max_tokens'?",
        ),
        ("{{gen a max_tokens=lots}}", "{{gen a}}: max_tokens must be"),
        ("{{gen a temperature=-1}}", "{{gen a}}: temperature must be >= 0"),
        ('{{gen a choices="one"}}', "choices of {{gen a}} need two or more options"),
        ('{{gen a choices="a|a"}}', "{{gen a}}: choices must differ, got ['a', 'a']"),
        ('{{gen a choices="a||b"}}', "{{gen a}}: choices must hold only non-empty strings"),
        ('{{gen a choices="a|"}}', "{{gen a}}: choices must hold only non-empty strings"),
        ("{{gen a max_tokens=5 max_tokens=6}}", "{{gen a}} sets max_tokens twice (only stop"),
        ('{{gen a choices="x|y" choices="x|z"}}', "{{gen a}} sets choices twice"),
        ("{{gen}}", "{{gen ...}} needs an output name"),
        ('{{gen a stop="x}}', 'cannot parse {{gen a stop="x}}'),
        ("{{q}} {{gen a}} {{gen a}}", "output 'a' is generated twice; rename one"),
        ("{{q}}", "the template has no {{gen name}}, so it outputs nothing"),
        ("{{#sytem}}hi{{#assistant}}{{gen a}}", "unknown role {{#sytem}}; did you mean 'system'?"),
        ("hi {{#user}}{{q}}{{#assistant}}{{gen a}}", "text before the first role marker"),
        ("{{#user}}{{q}} {{gen a}}", "{{gen a}} is in a user message; generate only after"),
        ("{{a b}} {{gen c}}", "{{a b}} is not a placeholder name or a gen"),
    ],
)
def test_template_errors(source, fragment):
    with pytest.raises(TemplateError) as e:
        parse(source)
    assert str(e.value).startswith("semantic function 'f': ")
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "option, fragment",
    [
        ("temperature=nan", "temperature must be a finite number, got nan"),
        ("temperature=inf", "temperature must be a finite number, got inf"),
        ("temperature=-inf", "temperature must be"),
        ("temperature=hot", "temperature must be a number, got 'hot'"),
        ("top_p=1.5", "top_p must be in (0, 1], got 1.5"),
        ("top_p=nan", "top_p must be a finite number, got nan"),
        ("max_tokens=-5", "max_tokens must be a positive integer, got -5"),
        ("max_tokens=0", "max_tokens must be a positive integer, got 0"),
        ("max_tokens=1.5", "max_tokens must be a positive integer, got 1.5"),
        ("top_k=1.5", "top_k must be an integer, got 1.5"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
    ],
)
def test_gen_options_are_checked_by_sampling_params(option, fragment):
    """The template only reads each value; SamplingParams, the one place the rules live,
    rejects it, and the error names the function and the gen."""
    with pytest.raises(TemplateError) as e:
        parse(f"{{{{gen answer {option}}}}}")
    message = str(e.value)
    assert message.startswith("semantic function 'f': {{gen answer}}: ")
    assert fragment in message


def test_gen_option_values_are_read_as_numbers_where_they_are_numbers():
    gen = parse("{{gen a temperature=1 top_p=0.5 seed=7 max_tokens=12}}").gens[0]
    assert gen.params == SamplingParams(max_tokens=12, temperature=1.0, top_p=0.5, seed=7)
    assert type(gen.params.seed) is int


def test_a_bad_gen_option_fails_when_the_function_is_defined():
    import covey.graph as cg

    with pytest.raises(TemplateError, match=r"semantic function 'ask': \{\{gen y\}\}: temp"):

        @cg.semantic_function
        def ask(question: str):
            """{{question}} {{gen y temperature=nan}}"""


def test_choice_scoring_options_and_token_healing_after_a_trailing_space():
    gen = parse("Category: {{gen c choices=a|b choice_scoring=trie length_normalize=false}}")
    gen = gen.gens[0]
    assert gen.params.choice_scoring == "trie" and gen.params.length_normalize is False
    assert gen.params.token_healing  # the prompt ends inside a token: healed by default
    assert not parse("Category:{{gen c}}").gens[0].params.token_healing
    assert not parse("Category: {{gen c token_healing=false}}").gens[0].params.token_healing
    with pytest.raises(TemplateError, match="choice_scoring must be one of auto, whole, trie"):
        parse("{{gen c choices=a|b choice_scoring=best}}")
