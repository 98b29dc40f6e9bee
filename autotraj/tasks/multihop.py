"""Multi-hop questions over a generated corpus of invented facts (answerable only by searching).

`make_world(n_questions, seed)` invents a small world: countries, cities in them, people born in
the cities and companies founded by people and headquartered in cities. Every name is made up
from syllables (three per word, or two and a country ending), and every name word is used once in the whole world, so
no fact can be known in advance and searching a name finds its own passage. The world holds one
passage per entity (`Passage`: id, title, text) whose sentences state its facts in fixed forms
(`FACTS`: "X was born in C.", "C is a city in K.", ...), and `n_questions` questions, each about
entities of its own (a person or company asked about appears in no other question):

- born (2 hops): "In which country was X born?"  person -> city -> country
- headquarters (2 hops): "In which country is Y headquartered?"  company -> city -> country
- founder (3 hops): "In which country was the founder of Y born?"  company -> person -> city ->
  country

The gold answer is the country with its alias "Republic of K". `parse_question` and `read_fact`
are what a solver needs to read questions and retrieved passages (models/reference.py uses
them); they never look anything up in the world.

Determinism: only `random.Random(seed)` draws are used, so the world is the same on every run
and Python version. Real-word collisions are not checked against a dictionary; invented words of
three syllables make them unlikely.

Not here: splitting into train and test, writing the corpus or indexing it (tasks/builtin.py).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

Relation = Literal["born", "city_in", "founded_by", "headquartered"]
QuestionKind = Literal["born", "headquarters", "founder"]

# One fixed sentence per relation: how a passage states a fact about its subject.
FACTS: dict[Relation, str] = {
    "born": "{subject} was born in {object}.",
    "city_in": "{subject} is a city in {object}.",
    "founded_by": "{subject} was founded by {object}.",
    "headquartered": "{subject} is headquartered in {object}.",
}

QUESTIONS: dict[QuestionKind, str] = {
    "born": "In which country was {subject} born?",
    "headquarters": "In which country is {subject} headquartered?",
    "founder": "In which country was the founder of {subject} born?",
}

# The relations to follow from the question's subject to the answer, in order.
CHAINS: dict[QuestionKind, tuple[Relation, ...]] = {
    "born": ("born", "city_in"),
    "headquarters": ("headquartered", "city_in"),
    "founder": ("founded_by", "born", "city_in"),
}

QUESTION_SHARES: tuple[tuple[QuestionKind, int], ...] = (
    ("born", 4),
    ("headquarters", 3),
    ("founder", 3),
)  # relative frequencies of the question kinds

N_COUNTRIES = 16
N_CITIES = 80

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "th", "tr", "sh")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "au")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s")
_COUNTRY_ENDINGS = ("ia", "land", "stan", "ora")
_PROFESSIONS = ("an engineer", "a painter", "a chemist", "a merchant", "a composer",
                "an architect", "a physician", "a sailor", "a poet", "a banker")  # fmt: skip
_INDUSTRIES = ("shipping", "textile", "software", "mining", "brewing", "glassware",
               "publishing", "railway")  # fmt: skip
_COMPANY_SUFFIXES = ("Works", "Industries", "Holdings", "Foundry", "Trading")
_CITY_NOTES = ("a busy river port", "its old stone bridges", "a large grain market",
               "its hillside vineyards", "a famous clock tower", "its salt mines",
               "a university", "its lake shore")  # fmt: skip
_REGIONS = ("northern", "southern", "eastern", "western", "central")

_NAME = r"[A-Z][a-z]+(?: [A-Z][a-z]+)*"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    question: str
    kind: QuestionKind
    subject: str
    answers: tuple[str, ...]  # the country, then its alias


@dataclass(frozen=True)
class World:
    passages: tuple[Passage, ...]
    questions: tuple[Question, ...]


class _Names:
    """Unique invented words of invented syllables, never the same word twice."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int = 3, ending: str = "") -> str:
        while True:
            word = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(syllables)
            )
            word = (word + ending).capitalize()
            if word not in self.used and len(word) <= 12:
                self.used.add(word)
                return word


def make_world(n_questions: int, seed: int = 0) -> World:
    """The invented world with `n_questions` questions (see the module docstring)."""
    rng = random.Random(seed)
    names = _Names(rng)
    passages: list[Passage] = []
    countries = [names.word(2, rng.choice(_COUNTRY_ENDINGS)) for _ in range(N_COUNTRIES)]
    for country in countries:
        passages.append(
            Passage(
                f"country-{len(passages)}",
                country,
                f"{country} is a country in the {rng.choice(_REGIONS)} part of the continent. "
                f"Its official name is the Republic of {country}.",
            )
        )
    country_of: dict[str, str] = {}
    for _ in range(N_CITIES):
        city, country = names.word(), rng.choice(countries)
        country_of[city] = country
        passages.append(
            Passage(
                f"city-{len(passages)}",
                city,
                f"{FACTS['city_in'].format(subject=city, object=country)} "
                f"{city} is known for {rng.choice(_CITY_NOTES)}.",
            )
        )
    cities = list(country_of)
    kinds = [kind for kind, share in QUESTION_SHARES for _ in range(share)]
    questions = []
    for _ in range(n_questions):
        kind = rng.choice(kinds)
        if kind == "born":
            subject, city = _person(rng, names, cities, passages, company=None)
        else:
            subject, city = _company(rng, names, cities, passages, with_founder=kind == "founder")
        country = country_of[city]
        questions.append(
            Question(
                QUESTIONS[kind].format(subject=subject),
                kind,
                subject,
                (country, f"Republic of {country}"),
            )
        )
    return World(tuple(passages), tuple(questions))


def _person(
    rng: random.Random,
    names: _Names,
    cities: list[str],
    passages: list[Passage],
    company: str | None,
) -> tuple[str, str]:
    """Add a person's passage; return (the person, the city of birth)."""
    person, city = f"{names.word()} {names.word()}", rng.choice(cities)
    founded = f" {person} founded {company}." if company else ""
    passages.append(
        Passage(
            f"person-{len(passages)}",
            person,
            f"{person} is {rng.choice(_PROFESSIONS)}. "
            f"{FACTS['born'].format(subject=person, object=city)}{founded}",
        )
    )
    return person, city


def _company(
    rng: random.Random,
    names: _Names,
    cities: list[str],
    passages: list[Passage],
    with_founder: bool,
) -> tuple[str, str]:
    """Add a company's passage (and its founder's); return (the company, the city that answers:
    the founder's birthplace with a founder, else the headquarters)."""
    company, headquarters = f"{names.word()} {rng.choice(_COMPANY_SUFFIXES)}", rng.choice(cities)
    founder_line, city = "", headquarters
    if with_founder:
        founder, city = _person(rng, names, cities, passages, company=company)
        founder_line = " " + FACTS["founded_by"].format(subject=company, object=founder)
    passages.append(
        Passage(
            f"company-{len(passages)}",
            company,
            f"{company} is a {rng.choice(_INDUSTRIES)} company.{founder_line} "
            f"{FACTS['headquartered'].format(subject=company, object=headquarters)}",
        )
    )
    return company, city


def parse_question(question: str) -> tuple[QuestionKind, str] | None:
    """(question kind, subject) of a multi-hop question; None if it is not one.

    >>> parse_question("In which country was the founder of Vaelor Works born?")
    ('founder', 'Vaelor Works')
    """
    for kind, form in QUESTIONS.items():
        prefix, suffix = form.split("{subject}")
        match = re.fullmatch(re.escape(prefix) + f"({_NAME})" + re.escape(suffix), question.strip())
        if match:
            return kind, match.group(1)
    return None


def read_fact(text: str, relation: Relation, subject: str) -> str | None:
    """The object of `relation` for `subject` as stated in `text` (a retrieved passage), if any.

    >>> read_fact("Kora Vel was born in Dunmere. Kora Vel is a poet.", "born", "Kora Vel")
    'Dunmere'
    """
    middle, end = FACTS[relation].removeprefix("{subject}").split("{object}")
    pattern = re.escape(subject + middle) + f"({_NAME})" + re.escape(end)
    match = re.search(pattern, text)
    return match.group(1) if match else None
