"""The prompt of each built-in labelled task: a template with `{text}` (and `{text_b}` for a
pair), the word each label is answered with, and the encoders' cloze pattern with `[MASK]`
(Schick and Schuetze 2021, PET: "It was [MASK]." -> great / terrible). A user replaces one with
`--tasks.template FILE` (JSON or YAML with the same keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PretuneError


@dataclass(frozen=True)
class Template:
    prompt: str                       # "Review: {text}\nSentiment:"; the answer follows after a space
    answers: dict[str, str]           # label -> the word a decoder answers with
    pattern: str = "{text} It was [MASK]."   # an encoder's cloze pattern
    mlm_answers: dict[str, str] = field(default_factory=dict)  # label -> one vocabulary word at [MASK]
    separator: str = "\n\n"           # between k-shot demonstrations

    def fill(self, text: str, text_b: str | None = None) -> str:
        return self.prompt.replace("{text}", text).replace("{text_b}", text_b or "")

    def fill_pattern(self, text: str, text_b: str | None = None) -> str:
        return self.pattern.replace("{text}", text).replace("{text_b}", text_b or "")


_SENTIMENT = dict(answers={"negative": "negative", "positive": "positive"},
                  mlm_answers={"negative": "terrible", "positive": "great"})

TEMPLATES: dict[str, Template] = {
    "movie-sentiment": Template("Review: {text}\nSentiment:", **_SENTIMENT),
    "tweet-sentiment": Template("Tweet: {text}\nSentiment:", **_SENTIMENT),
    "sms-spam": Template("Message: {text}\nIs this message spam or ham? Answer:", {"ham": "ham", "spam": "spam"},
                         "{text} Is it spam? [MASK].", {"ham": "no", "spam": "yes"}),
    # TREC's coarse classes (Li and Roth 2002)
    "trec": Template("Question: {text}\nThe answer is a:", {"ABBR": "abbreviation", "DESC": "description",
                     "ENTY": "thing", "HUM": "person", "LOC": "place", "NUM": "number"},
                     "[MASK]: {text}", {"ABBR": "abbreviation", "DESC": "description", "ENTY": "thing",
                                        "HUM": "person", "LOC": "place", "NUM": "number"}),
}


def default_template(labels: list[str]) -> Template:
    """For a user's task: the labels are their own answers."""
    return Template("Text: {text}\nLabel:", {y: y for y in labels}, "{text} [MASK].", {y: y for y in labels})


def check(t: Template, labels: list[str], pair: bool, where: str) -> Template:
    """A template that can prompt this task: the text's placeholder, an answer for every label."""
    if "{text}" not in t.prompt:
        raise PretuneError("the template has no {text} placeholder", where,
                           'write the prompt with {text} where the example goes, e.g. "Review: {text}\\nSentiment:"')
    if "{text}" not in t.pattern or "[MASK]" not in t.pattern:
        raise PretuneError("the cloze pattern needs {text} and [MASK]", where, 'write e.g. "{text} It was [MASK]."')
    if pair and "{text_b}" not in t.prompt:
        raise PretuneError("the task has text pairs but the template has no {text_b}", where, "add {text_b}")
    for key in ("answers", "mlm_answers"):
        missing = [y for y in labels if y not in getattr(t, key)]
        if missing and (key == "answers" or getattr(t, key)):
            raise PretuneError(f"the template's {key} have no word for the label '{missing[0]}'", where,
                               f"give a word for each of {', '.join(labels)}")
    return t


def load_template(path: str | Path | None, task: str, labels: list[str], pair: bool = False) -> Template:
    """The user's template file, else the task's built-in one, else labels as their own answers."""
    if path is None:
        t = TEMPLATES.get(task) or default_template(labels)
        return check(t if t.mlm_answers else Template(t.prompt, t.answers, t.pattern, dict(t.answers), t.separator),
                     labels, pair, f"the template of {task}")
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(raw)
        else:
            d = json.loads(raw)
    except OSError as e:
        raise PretuneError(f"cannot read the template ({e.strerror})", str(p), "give a .json or .yaml file") from e
    except ValueError as e:
        raise PretuneError("the template is not valid JSON/YAML", str(p), "fix its syntax") from e
    if not isinstance(d, dict) or "prompt" not in d:
        raise PretuneError("the template has no 'prompt'", str(p),
                           'write {"prompt": "Review: {text}\\nSentiment:", "answers": {"positive": "positive", ...}}')
    base = TEMPLATES.get(task) or default_template(labels)
    t = Template(str(d["prompt"]), dict(d.get("answers") or base.answers), str(d.get("pattern") or base.pattern),
                 dict(d.get("mlm_answers") or base.mlm_answers or d.get("answers") or base.answers),
                 str(d.get("separator", base.separator)))
    return check(t, labels, pair, str(p))
