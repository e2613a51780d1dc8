"""Prompt templates: exact renderings of known examples, promptsource's conventions, the sandbox, and bad template
files named by file, line, key and template."""
import textwrap
from pathlib import Path

import pytest

from t5x_lite import prompts

TEMPLATES = Path(__file__).resolve().parent.parent / "tasks" / "templates"
COPA_EXAMPLE = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0}


def template_file(tmp_path, body: str, name: str = "templates.yaml") -> Path:
    """A template file of one dataset whose templates are `body` (YAML, indented under `templates:`)."""
    path = tmp_path / name
    path.write_text("dataset: test\ntemplates:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n")
    return path


def one_template(jinja: str, answer_choices: str | None = None, **kwargs) -> prompts.Template:
    return prompts.Template(id="t1", name="test", jinja=jinja, answer_choices=answer_choices, **kwargs)


def test_the_built_in_templates_render_known_examples_exactly():
    rte = prompts.load_templates(str(TEMPLATES / "rte.yaml"))
    example = {"premise": "No weapons were found.", "hypothesis": "Weapons were found.", "label": 1, "idx": 0}
    assert rte["does it follow that"].render(example, 0) == prompts.Prompted(
        "No weapons were found. Does it follow that Weapons were found. Yes or no?", "no", ("yes", "no"))
    assert rte["GPT-3 style"].render(example, 0) == prompts.Prompted(
        "No weapons were found.\nQuestion: Weapons were found. True or False?", "False", ("True", "False"))

    copa = prompts.load_templates(str(TEMPLATES / "copa.yaml"))
    assert copa["because or so"].render(COPA_EXAMPLE, 0) == prompts.Prompted(
        "The man turned on the faucet so...", "water flowed from the spout.",
        ("the toilet filled with water.", "water flowed from the spout."))
    assert copa["cause or effect"].render({**COPA_EXAMPLE, "question": "cause", "label": 0}, 0) == prompts.Prompted(
        "The man turned on the faucet. What was the cause?", "The toilet filled with water.",
        ("The toilet filled with water.", "Water flowed from the spout."))

    sst2 = prompts.load_templates(str(TEMPLATES / "sst2.yaml"))
    review = {"sentence": "a gorgeous , witty film .", "label": 1, "idx": 3}
    assert sst2["write a review"].render(review, 3) == prompts.Prompted(
        "Write a positive sentence from a movie review.", "a gorgeous , witty film .", None)

    trec = prompts.load_templates(str(TEMPLATES / "trec.yaml"))
    city = {"text": "What is the capital of Peru ?", "coarse_label": 4, "fine_label": 32}
    assert trec["kind of place"].render(city, 0) == prompts.Prompted(
        "What kind of place does this question ask about: a city, a country, a mountain, a state, or another kind "
        "of place?\nWhat is the capital of Peru ?", "a city",
        ("a city", "a country", "a mountain", "another kind of place", "a state"))
    # Not a location question: the template renders nothing, promptsource's way of skipping the example.
    assert trec["kind of place"].render({**city, "coarse_label": 3, "fine_label": 29}, 1) is None


def test_every_evaluation_dataset_has_an_original_task_template_with_answer_choices():
    for name in ("sst2", "ag_news", "trec", "mrpc", "rte", "cb", "copa"):
        collection = prompts.load_templates(str(TEMPLATES / f"{name}.yaml"))
        assert len(collection.templates) >= 3, name
        if name in ("rte", "cb", "copa"):
            assert any(t.metadata.original_task and t.answer_choices for t in collection.templates), name


def test_promptsource_conventions(tmp_path):
    path = template_file(tmp_path, """
        a: !Template
          id: a
          name: pipes and choices
          jinja: '{{ question }} Options: {{ answer_choices | join(" or ") }} ||| {{ answer_choices[label] }}'
          answer_choices: '{{ first }} ||| {{ second }}'
          metadata: !TemplateMetadata
            original_task: true
            choices_in_prompt: true
            metrics: [Accuracy]
        b: !Template
          id: b
          name: vote and zip
          jinja: |-
            {% for q, a in zip(questions, answers) %}{{ q }}={{ a }}; {% endfor %}
            ||| {{ votes | most_frequent | join(",") }}
        c:
          id: c
          name: long
          jinja: '{{ text }} ||| ok'
    """)
    collection = prompts.load_templates(str(path), max_variable_length=20)
    assert collection.dataset == "test" and collection.subset is None
    assert collection["pipes and choices"].metadata == prompts.TemplateMetadata(True, True, ("Accuracy",), ())
    # A '|||' inside a value is text, not a separator, in the prompt and in the answer choices.
    example = {"question": "A|||B?", "first": "x ||| y", "second": "z", "label": 0}
    assert collection["pipes and choices"].render(example, 0) == prompts.Prompted(
        "A|||B? Options: x ||| y or z", "x ||| y", ("x ||| y", "z"))
    # zip is a global; most_frequent gives the most frequent items, in order of first occurrence.
    votes = {"questions": ["p", "q"], "answers": [1, 2], "votes": ["a", "b", "b", "a", "c"]}
    assert collection["vote and zip"].render(votes, 0) == prompts.Prompted("p=1; q=2;", "a,b", None)
    # Values are cut to max_variable_length characters at a word boundary (Jinja's truncate, 5 characters leeway).
    assert collection["long"].render({"text": "alpha beta gamma delta epsilon zeta"}, 0).inputs == "alpha beta gamma..."
    assert collection["long"].render({"text": "alpha beta gamma delta e"}, 0).inputs == "alpha beta gamma delta e"


def test_choice_is_seeded_by_template_and_example_index():
    jinja = "{{ ['a', 'b', 'c', 'd', 'e', 'f'] | choice }} ||| x"
    first = [one_template(jinja).render({}, index).inputs for index in range(20)]
    # Another instance, rendering in another order, gives each example the same choice.
    second = one_template(jinja)
    assert [second.render({}, index).inputs for index in reversed(range(20))] == first[::-1]
    assert len(set(first)) > 1  # drawn per example, not once per template
    other_id = prompts.Template(id="t2", name="test", jinja=jinja)
    assert [other_id.render({}, index).inputs for index in range(20)] != first


def test_render_errors_name_the_template_and_the_example():
    with pytest.raises(prompts.TemplateRenderError, match=r"<string>: template 'test' \(id t1\) failed on example 7: "
                                                          r"UndefinedError: 'hypothesis' is undefined"):
        one_template("{{ premise }} {{ hypothesis }} ||| x").render({"premise": "p"}, 7)
    with pytest.raises(prompts.TemplateRenderError, match=r"failed on example 2: TypeError"):
        one_template("{{ label + 1 }} ||| x").render({"label": "one"}, 2)
    # A label outside the answer choices: out of range, or a target that is not among them.
    with pytest.raises(prompts.TemplateRenderError, match=r"failed on example 0: UndefinedError: list object has no "
                                                          r"element 5"):
        one_template("q ||| {{ answer_choices[label] }}", "Yes ||| No").render({"label": 5}, 0)
    with pytest.raises(prompts.TemplateRenderError, match=r"on example 4 the target 'Maybe' is not one of the answer "
                                                          r"choices \['Yes', 'No'\]"):
        one_template("q ||| {{ label }}", "Yes ||| No").render({"label": "Maybe"}, 4)
    with pytest.raises(prompts.TemplateRenderError, match=r"rendered 2 '\|\|\|' separators on example 0"):
        one_template("a ||| b ||| c").render({}, 0)
    with pytest.raises(prompts.TemplateRenderError, match="field 'answer_choices'"):
        one_template("a ||| b").render({"answer_choices": "x"}, 0)
    assert one_template("{% if keep %}a ||| b{% endif %}").render({"keep": False}, 0) is None
    assert one_template("a ||| {{ target }}").render({"target": " "}, 0) is None


@pytest.mark.parametrize("jinja, name", [
    ("{{ ''.__class__.__mro__ }} ||| x", "__class__"),
    ("{{ x.__globals__ }} ||| x", "__globals__"),
    ("{{ cycler.__init__.__globals__.os }} ||| x", "__init__"),
    ("{{ x['__class__'] }} ||| x", "__class__"),
    ("{{ x._private }} ||| x", "_private"),
])
def test_the_sandbox_refuses_python_internals_when_a_template_is_loaded(jinja, name):
    with pytest.raises(prompts.TemplateSecurityError, match=rf"template 'test' \(id t1\): line 1 of its jinja reaches "
                                                            rf"for .*'{name}'"):
        one_template(jinja)


@pytest.mark.parametrize("jinja", [
    "{% set name = '__cla' ~ 'ss__' %}{{ ''[name] }} ||| x",
    "{{ '' | attr('__cla' ~ 'ss__') }} ||| x",
    "{{ '{0.__class__}'.format('') }} ||| x",
    "{{ items.append(1) }} ||| x",  # the sandbox is immutable: templates cannot change an example
])
def test_the_sandbox_refuses_python_internals_when_a_template_runs(jinja):
    template = one_template(jinja)
    with pytest.raises(prompts.TemplateSecurityError, match=r"template 'test' \(id t1\) reaches for Python internals "
                                                            r"on example 3, which the sandbox refuses: access to "
                                                            r"attribute"):
        template.render({"items": []}, 3)


@pytest.mark.parametrize("body, error", [
    ("""
     a: !Template
       id: a
       name: x
       jinja: 'q ||| a'
       jinjaa: 'q ||| a'
     """, r"templates.yaml:7: template 'a' has an unknown key 'jinjaa'; valid keys: \['id', 'name', 'jinja'"),
    ("""
     a: !Template
       id: a
       name: x
     """, r"templates.yaml:3: template 'a' has no 'jinja'"),
    ("""
     a: !Template
       id: b
       name: x
       jinja: 'q ||| a'
     """, r"templates.yaml:4: template 'x': its id 'b' differs from its key 'a'"),
    ("""
     a: !Template
       id: a
       name: x
       jinja: 'q ||| a'
     b: !Template
       id: b
       name: x
       jinja: 'q ||| a'
     """, r"templates.yaml:7: two templates are named 'x' \(the other at line 3\)"),
    ("""
     a: !Template
       id: a
       name: x
       name: y
       jinja: 'q ||| a'
     """, r"(?s)templates.yaml: not a template file: duplicate key 'name'.*templates.yaml\", line 6"),
    ("""
     a: !Template
       id: a
       name: x
       jinja: 'no separator'
     """, r"templates.yaml:3: template 'x' \(id a\): its jinja has no '\|\|\|'"),
    ("""
     a: !Template
       id: a
       name: x
       jinja: "q ||| {{ a "
     """, r"templates.yaml:3: template 'x' \(id a\): line 1 of its jinja: unexpected end of template"),
    ("""
     a: !Template
       id: a
       name: x
       jinja: 'q ||| a'
       answer_choices: [yes, no]
     """, r"templates.yaml:7: template 'x': 'answer_choices' must be str or null, got \[True, False\]"),
    ("""
     a: !Template
       id: a
       name: x
       jinja: 'q ||| a'
       metadata: !TemplateMetadata
         original_task: yes please
     """, r"templates.yaml:8: template 'x''s metadata: 'original_task' must be bool or null, got 'yes please'"),
    ("""
     a: !!python/object/apply:os.system ['touch pwned']
     """, r"templates.yaml: not a template file: could not determine a constructor for the tag "
          r"'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_bad_template_files_are_named_by_file_line_and_key(tmp_path, body, error):
    path = template_file(tmp_path, body)
    with pytest.raises(prompts.TemplateError, match=error):
        prompts.load_templates(str(path))
    assert not Path("touch pwned").exists() and not (tmp_path / "pwned").exists()


def test_task_names_are_cleaned_as_t0_cleans_them():
    """T0's task_clean (bigscience-workshop/t-zero, t0/seqio_tasks/utils.py): each run of characters other than
    letters, digits, '_' and '.' becomes one '_', and nothing is stripped (T0 has e.g.
    'dbpedia_14_given_a_choice_of_categories_' from the template 'given a choice of categories ')."""
    assert prompts.clean_task_name("super_glue_rte_GPT-3 style") == "super_glue_rte_GPT_3_style"
    assert prompts.clean_task_name("super_glue_rte_does it follow that?") == "super_glue_rte_does_it_follow_that_"
    assert prompts.clean_task_name("dbpedia_14_given a choice of categories ") == (
        "dbpedia_14_given_a_choice_of_categories_")
    assert prompts.clean_task_name("super_glue_wsc.fixed_I think they mean") == "super_glue_wsc.fixed_I_think_they_mean"
    assert prompts.clean_task_name("ag_news_(1) which -- section?!") == "ag_news__1_which_section_"  # '_' stays
    assert prompts.clean_task_name("xnli_fr_Crème brûlée") == "xnli_fr_Crème_brûlée"  # \w: Unicode letters stay
