"""The language of the shapes world: its vocabulary, functional programs, templates, balance.

As in CLEVR (Johnson et al. 2017, "CLEVR: A Diagnostic Dataset for Compositional Language
and Elementary Visual Reasoning", https://cs.stanford.edu/people/jcjohns/clevr/), a
question is a functional program over the scene graph (filter_<attr>, relate, same_<attr>,
unique, count, exist, query_<attr>, equal_<attr>, equal_integer, greater_than, less_than,
union, intersect); executing it gives the answer, and an English template with synonyms
gives the text. The same templates, compiled to regular expressions, read a free question
back (`true_answer`).

Generation (`QuestionGenerator`) draws, per question, a *plan* (template, the attribute
names in the text, which attribute kinds each free description names), then random
fillings of it (attribute values, relations, referenced objects) until it has `CANDIDATES`
that execute, and keeps one whose answer this plan has given least so far, the family's
counts breaking ties: CLEVR's rejection sampling, keyed by plan. Every rule that fills a
plan treats all attribute values alike (copy a random object's values, pick values no
object has, pick any object), so all texts of a plan are equally likely under each
answer: P(answer | exact text) = P(answer | plan), which the counts keep flat. That is why
a question-only model is near chance (`vqa.metrics.blind_baseline`). The most frequent answer of a
family, worst of 12 seeds of 300 scenes: yes/no 50.8%, count 20.2% ("0"; 3-10 objects make
large counts rarer), query_attribute 7.8% (16 values); tests hold them under 53/22/9%.

A scene is a dict as `vqa.shapes_world` writes it: `objects` (shape, color, size,
material, pixel_coords, radius) and `relationships[rel][i]` = the objects that are `rel`
of object i. A pair closer than the relation margin along an axis is in neither list of
that axis; a relation question about such a pair is ambiguous and never asked or answered.
"""

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable


# Attribute -> values. Descriptions name them in CLEVR's order: size, color, material, shape.
ATTRIBUTES = {
    "size": ("small", "large"),
    "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "material": ("solid", "outline"),  # filled, or a thick outline around background: the 2D rubber/metal
    "shape": ("circle", "square", "triangle", "diamond"),
}
RELATIONS = ("left", "right", "above", "below")
FAMILIES = ("exist", "count", "compare_integer", "query_attribute", "compare_attribute")
ANSWER_TYPES = {"exist": "yes/no", "count": "number", "compare_integer": "yes/no",
                "query_attribute": "other", "compare_attribute": "yes/no"}

# Words for each value in questions; generation picks any, parsing accepts any.
WORDS = {
    "small": ("small", "tiny"), "large": ("large", "big"),
    "solid": ("solid", "filled"), "outline": ("outline", "hollow"),
    "circle": ("circle", "ball"), "square": ("square", "block"),
    "triangle": ("triangle",), "diamond": ("diamond",),
    **{color: (color,) for color in ATTRIBUTES["color"]},
}
THING_WORDS = ("thing", "object")  # the noun when the description names no shape
RELATION_WORDS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                  "above": ("above",), "below": ("below", "beneath")}
# Accepted when parsing, never generated.
ALSO_ACCEPTED = {"grey": "gray", "colour": "color", "outlined": "outline", "cube": "square", "sphere": "circle"}
_VALUE_OF_WORD = {word: value for value, words in WORDS.items() for word in words}
_KIND_OF_VALUE = {value: kind for kind, values in ATTRIBUTES.items() for value in values}


class Ambiguous(Exception):
    """A reference matches zero or several objects, or a relation meets a pair closer than the margin."""


# ----------------------------------------------------------------------------- programs
# A program is a nested tuple (function, side_input, *inputs), CLEVR's functions by name.
SCENE = ("scene", None)


def filtered(description: dict, inner=SCENE) -> tuple:
    for kind in ATTRIBUTES:
        if kind in description:
            inner = (f"filter_{kind}", description[kind], inner)
    return inner


def unique(description: dict, inner=SCENE) -> tuple:
    return ("unique", None, filtered(description, inner))


def relate(relation: str, obj: tuple) -> tuple:
    return ("relate", relation, obj)


def same(kind: str, obj: tuple) -> tuple:
    return (f"same_{kind}", None, obj)


def execute(program: tuple, scene: dict):
    """The value of a program on a scene: a frozenset of object indices, an index, int, bool or str.

    Raises Ambiguous where CLEVR's executor would return an error.
    """
    return _FUNCTIONS[program[0]](scene, program[1], *[execute(p, scene) for p in program[2:]])


def _unique(scene, side, objects):
    if len(objects) != 1:
        raise Ambiguous(f"{len(objects)} objects match a reference that must name one")
    return next(iter(objects))


def _filter(kind):
    def run(scene, value, s):
        objects = scene["objects"]
        return frozenset([i for i in s if objects[i][kind] == value])
    return run


def _same(kind):
    def run(scene, side, obj):
        objects = scene["objects"]
        value = objects[obj][kind]
        return frozenset([j for j, o in enumerate(objects) if j != obj and o[kind] == value])
    return run


def _query_function(kind):
    return lambda scene, side, obj: scene["objects"][obj][kind]


_FUNCTIONS = {
    "scene": lambda scene, side: frozenset(range(len(scene["objects"]))),
    "unique": _unique,
    "relate": lambda scene, relation, obj: _related(scene, relation, obj),
    "count": lambda scene, side, s: len(s),
    "exist": lambda scene, side, s: bool(s),
    "union": lambda scene, side, a, b: a | b,
    "intersect": lambda scene, side, a, b: a & b,
    "equal_integer": lambda scene, side, a, b: a == b,
    "greater_than": lambda scene, side, a, b: a > b,
    "less_than": lambda scene, side, a, b: a < b,
}
for _kind in ATTRIBUTES:
    _FUNCTIONS.update({f"filter_{_kind}": _filter(_kind), f"same_{_kind}": _same(_kind),
                       f"query_{_kind}": _query_function(_kind), f"equal_{_kind}": _FUNCTIONS["equal_integer"]})


def _related(scene: dict, relation: str, obj: int) -> frozenset:
    relationships = scene["relationships"]
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    # An object in neither list of the axis sits within the margin of `obj`: its side is unclear.
    decided = len(relationships[relation][obj]) + len(relationships[opposite][obj])
    if decided != len(scene["objects"]) - 1:
        raise Ambiguous(f"an object is too close to object {obj} to say what is {relation} of it")
    return frozenset(relationships[relation][obj])


def answer_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# ---------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Slot:
    """One blank of a template.

    kind: "free" (a description, values drawn at random), "ref" (names one object: unique
    among `within`, or the scene), "rel" (a relation) or "attr" (an attribute name).
    avoid: attr slots whose attribute this description must not name (it would give the answer away).
    """

    name: str
    kind: str
    avoid: tuple = ()
    nonempty: bool = False  # free: name at least one attribute ("things" would make it trivial)
    # free: the description names a colour or a shape; sizes and materials alone (2 values
    # each) are nearly always present among 3+ objects: "is there a large thing?" is "yes".
    specific: bool = False
    # slots -> program of the set the description picks from: a ref is unique in it, a
    # free description copies its values from one of its objects half of the time.
    within: Callable | None = None
    distinct: tuple = ()  # slots this one must differ from: a ref's object, a free description's words
    # attr: pick an attribute in proportion to its number of values, so that every value
    # (8 colours, 4 shapes, 2 sizes, 2 materials) is an equally frequent answer.
    by_values: bool = False
    # ref: half of the time pick an object with the same attribute (slot A) as this ref
    # slot's object, so that "same color as" is "yes" about as often as "no".
    like: str | None = None


@dataclass(frozen=True)
class Template:
    id: str
    family: str
    texts: tuple  # English variants; {X} a slot, {X:pl} a plural description, {a} "a"/"an"
    slots: tuple
    build: Callable  # slots -> program

    @property
    def relation(self) -> bool:
        return any(s.kind == "rel" for s in self.slots)


def _count(p):
    return ("count", None, p)


def _query(kind, p):
    return (f"query_{kind}", None, p)


def _in_relation(s, d="D", r="R", u="U"):
    return filtered(s[d], relate(s[r], unique(s[u])))


def _same_as(s, d="D", a="A", u="U"):
    return filtered(s[d], same(s[a], unique(s[u])))


def _related_to(s, r="R", u="U"):
    return relate(s[r], unique(s[u]))


def _sharing(s):
    return same(s["A"], unique(s["U"]))


def _between(s):
    return ("intersect", None, relate(s["R1"], unique(s["U1"])), relate(s["R2"], unique(s["U2"])))


_U, _R, _A, _Q = Slot("U", "ref"), Slot("R", "rel"), Slot("A", "attr"), Slot("Q", "attr", by_values=True)
_D1, _D2 = Slot("D1", "free", nonempty=True), Slot("D2", "free", nonempty=True, distinct=("D1",))

TEMPLATES = (
    Template("exist", "exist", ("Are there any {D:pl}?", "Is there {a} {D}?"),
             (Slot("D", "free", specific=True),), lambda s: ("exist", None, filtered(s["D"]))),
    Template("exist_relate", "exist", ("Are there any {D:pl} {R} the {U}?", "Is there {a} {D} {R} the {U}?"),
             (_U, _R, Slot("D", "free", within=_related_to)), lambda s: ("exist", None, _in_relation(s))),
    Template("exist_same", "exist", ("Are there any other {D:pl} that have the same {A} as the {U}?",
                                     "Is there another {D} that has the same {A} as the {U}?"),
             (_U, _A, Slot("D", "free", avoid=("A",), specific=True, within=_sharing)),
             lambda s: ("exist", None, _same_as(s))),
    Template("count", "count", ("How many {D:pl} are there?", "What number of {D:pl} are there?"),
             (Slot("D", "free"),), lambda s: _count(filtered(s["D"]))),
    Template("count_relate", "count", ("How many {D:pl} are {R} the {U}?", "What number of {D:pl} are {R} the {U}?"),
             (_U, _R, Slot("D", "free", within=_related_to)), lambda s: _count(_in_relation(s))),
    Template("count_same", "count", ("How many other {D:pl} have the same {A} as the {U}?",
                                     "What number of other {D:pl} have the same {A} as the {U}?"),
             (_U, _A, Slot("D", "free", avoid=("A",), within=_sharing)), lambda s: _count(_same_as(s))),
    Template("count_or", "count", ("How many things are either {D1:pl} or {D2:pl}?",
                                   "What number of objects are {D1:pl} or {D2:pl}?"),
             (_D1, _D2), lambda s: _count(("union", None, filtered(s["D1"]), filtered(s["D2"])))),
    Template("count_and", "count", ("How many {D:pl} are both {R1} the {U1} and {R2} the {U2}?",
                                    "What number of {D:pl} are {R1} the {U1} and {R2} the {U2}?"),
             (Slot("U1", "ref"), Slot("R1", "rel"), Slot("U2", "ref", distinct=("U1",)), Slot("R2", "rel"),
              Slot("D", "free", within=_between)),
             lambda s: _count(filtered(s["D"], _between(s)))),
    Template("compare_more", "compare_integer", ("Are there more {D1:pl} than {D2:pl}?",),
             (_D1, _D2), lambda s: ("greater_than", None, _count(filtered(s["D1"])), _count(filtered(s["D2"])))),
    Template("compare_fewer", "compare_integer", ("Are there fewer {D1:pl} than {D2:pl}?",),
             (_D1, _D2), lambda s: ("less_than", None, _count(filtered(s["D1"])), _count(filtered(s["D2"])))),
    Template("compare_equal", "compare_integer", ("Are there the same number of {D1:pl} and {D2:pl}?",
                                                  "Is the number of {D1:pl} the same as the number of {D2:pl}?"),
             (_D1, _D2), lambda s: ("equal_integer", None, _count(filtered(s["D1"])), _count(filtered(s["D2"])))),
    Template("compare_more_relate", "compare_integer", ("Are there more {D1:pl} {R} the {U} than {D2:pl}?",),
             (_U, _R, Slot("D1", "free", within=_related_to), _D2),
             lambda s: ("greater_than", None, _count(_in_relation(s, "D1")), _count(filtered(s["D2"])))),
    Template("compare_fewer_relate", "compare_integer", ("Are there fewer {D1:pl} {R} the {U} than {D2:pl}?",),
             (_U, _R, Slot("D1", "free", within=_related_to), _D2),
             lambda s: ("less_than", None, _count(_in_relation(s, "D1")), _count(filtered(s["D2"])))),
    Template("compare_equal_same", "compare_integer",
             ("Are there as many {D1:pl} as other {D2:pl} that have the same {A} as the {U}?",
              "Is the number of {D1:pl} the same as the number of other {D2:pl} that have the same {A} as the {U}?"),
             (_D1, _U, _A, Slot("D2", "free", avoid=("A",), within=_sharing)),
             lambda s: ("equal_integer", None, _count(filtered(s["D1"])), _count(_same_as(s, "D2")))),
    Template("query", "query_attribute", ("What {Q} is the {U}?", "What is the {Q} of the {U}?"),
             (_Q, Slot("U", "ref", avoid=("Q",))), lambda s: _query(s["Q"], unique(s["U"]))),
    Template("query_relate", "query_attribute", ("What {Q} is the {D} {R} the {U}?",
                                                 "What is the {Q} of the {D} that is {R} the {U}?"),
             (_Q, _U, _R, Slot("D", "ref", avoid=("Q",), within=_related_to)),
             lambda s: _query(s["Q"], ("unique", None, _in_relation(s)))),
    Template("query_same", "query_attribute", ("What {Q} is the other {D} that has the same {A} as the {U}?",
                                               "What is the {Q} of the other {D} that has the same {A} as the {U}?"),
             (_Q, Slot("A", "attr", avoid=("Q",)), _U,
              Slot("D", "ref", avoid=("Q", "A"), within=_sharing)),
             lambda s: _query(s["Q"], ("unique", None, _same_as(s)))),
    Template("same_attr", "compare_attribute", ("Does the {U1} have the same {A} as the {U2}?",
                                                "Is the {U1} the same {A} as the {U2}?"),
             (_A, Slot("U1", "ref", avoid=("A",)), Slot("U2", "ref", avoid=("A",), distinct=("U1",), like="U1")),
             lambda s: (f"equal_{s['A']}", None, _query(s["A"], unique(s["U1"])), _query(s["A"], unique(s["U2"])))),
    Template("same_attr_relate", "compare_attribute",
             ("Does the {D} {R} the {U1} have the same {A} as the {U2}?",
              "Is the {D} that is {R} the {U1} the same {A} as the {U2}?"),
             (_A, Slot("U1", "ref"), _R,
              Slot("D", "ref", avoid=("A",), within=lambda s: _related_to(s, u="U1")),
              Slot("U2", "ref", avoid=("A",), distinct=("D",), like="D")),
             lambda s: (f"equal_{s['A']}", None, _query(s["A"], ("unique", None, _in_relation(s, u="U1"))),
                        _query(s["A"], unique(s["U2"])))),
)
FAMILY_TEMPLATES = {family: tuple(t for t in TEMPLATES if t.family == family) for family in FAMILIES}


# -------------------------------------------------------------------------------- text
# Slot names say what fills them: D*/U* a description, R* a relation, A/Q an attribute name.
_PLACEHOLDER = re.compile(r"\{(\w+)(?::(pl))?\}")


def describe(description: dict, plural: bool, rng: random.Random) -> str:
    """'small red hollow circles': size, color, material, then the shape noun or 'thing'/'object'."""
    words = [rng.choice(WORDS[description[k]]) for k in ("size", "color", "material") if k in description]
    noun = rng.choice(WORDS[description["shape"]] if "shape" in description else THING_WORDS)
    return " ".join(words + [noun + ("s" if plural else "")])


def render_text(text: str, slots: dict, rng: random.Random) -> str:
    def fill(match):
        name, plural = match.group(1), match.group(2) == "pl"
        if name == "a":
            return "{a}"  # "a" or "an": known once the next word is
        if name[0] in "DU":
            return describe(slots[name], plural, rng)
        if name[0] == "R":
            return rng.choice(RELATION_WORDS[slots[name]])
        return slots[name]

    filled = _PLACEHOLDER.sub(fill, text)
    return re.sub(r"\{a\} (\w)", lambda m: ("an " if m.group(1) in "aeiou" else "a ") + m.group(1), filled)


def _alternation(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_ADJECTIVE = _alternation(w for v, ws in WORDS.items() if _KIND_OF_VALUE[v] != "shape" for w in ws)
_NOUN = _alternation([w for v in ATTRIBUTES["shape"] for w in WORDS[v]] + list(THING_WORDS))
_SLOT_PATTERNS = {
    "D": rf"(?:(?:{_ADJECTIVE}) )*(?:{_NOUN})s?",
    "R": _alternation(w for ws in RELATION_WORDS.values() for w in ws),
    "A": _alternation(ATTRIBUTES),
}


def _compile(text: str) -> re.Pattern:
    """A template variant as a regex over normalised text (see `normalize_question`)."""
    parts, position = [], 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[position:match.start()].lower()))
        name = match.group(1)
        if name == "a":
            parts.append("an?")
        else:
            kind = {"U": "D", "Q": "A"}.get(name[0], name[0])
            parts.append(f"(?P<{name}>{_SLOT_PATTERNS[kind]})")
        position = match.end()
    parts.append(re.escape(text[position:].lower().rstrip("?")))
    return re.compile("".join(parts))


_COMPILED = [(template, _compile(text)) for template in TEMPLATES for text in template.texts]
_RELATION_OF_WORDS = {w: rel for rel, ws in RELATION_WORDS.items() for w in ws}


def normalize_question(text: str) -> str:
    """Lower case, single spaces, no final '?', '.' or '!', spelling variants mapped ('grey' -> 'gray')."""
    words = []
    for word in text.lower().replace("?", " ").split():
        stem, plural = (word[:-1], "s") if word.endswith("s") and word[:-1] in ALSO_ACCEPTED else (word, "")
        words.append(ALSO_ACCEPTED.get(stem, stem) + plural)
    return " ".join(words).rstrip(".!").strip()


def _description(words: str) -> dict | None:
    """'small red circles' -> {'size': 'small', 'color': 'red', 'shape': 'circle'}; None if it names a kind twice."""
    *adjectives, noun = words.split()
    if noun not in _VALUE_OF_WORD and noun not in THING_WORDS:
        noun = noun[:-1]  # plural
    description = {} if noun in THING_WORDS else {"shape": _VALUE_OF_WORD[noun]}
    for word in adjectives:
        value = _VALUE_OF_WORD[word]
        if _KIND_OF_VALUE[value] in description:
            return None
        description[_KIND_OF_VALUE[value]] = value
    return description


def parse_question(text: str) -> tuple[Template, dict] | None:
    """(template, slots) of the first template a question matches, or None."""
    normalized = normalize_question(text)
    for template, pattern in _COMPILED:
        match = pattern.fullmatch(normalized)
        if not match:
            continue
        slots = {}
        for name, value in match.groupdict().items():
            if name[0] in "DU":
                slots[name] = _description(value)
            elif name[0] == "R":
                slots[name] = _RELATION_OF_WORDS[value]
            else:
                slots[name] = value
        if None not in slots.values():
            return template, slots
    return None


# Why a question has no true answer (`answer_or_reason`).
NO_TEMPLATE = "no template"  # it matches none of the templates
AMBIGUOUS = "ambiguous"  # it matches one, but presumes an object not unique in the scene, or a relation too close


def answer_or_reason(scene: dict, question: str) -> tuple[str | None, str | None]:
    """(the true answer, None), or (None, NO_TEMPLATE or AMBIGUOUS): see `true_answer`."""
    parsed = parse_question(question)
    if parsed is None:
        return None, NO_TEMPLATE
    template, slots = parsed
    try:
        return answer_text(execute(template.build(slots), scene)), None
    except Ambiguous:
        return None, AMBIGUOUS


def true_answer(scene: dict, question: str) -> str | None:
    """The answer to a free question about a scene, if it is one of the template questions.

    None when the question matches no template (case, spaces and a final '?' do not
    matter; synonyms and spelling variants are accepted), or when it presumes an object
    that is not unique in the scene, or asks about a relation that the margin leaves open.
    `answer_or_reason` says which.
    """
    return answer_or_reason(scene, question)[0]


# -------------------------------------------------------------------------- generation
CANDIDATES = 8  # valid fillings of a plan that the balance chooses from...
MAX_CANDIDATES = 12  # ...or more, up to this, while none has an answer the plan has given least
ATTEMPTS = 40  # fillings tried per plan before giving the plan up
PLANS = 30  # plans tried per question before trying another family
# How often a free description or a reference starts out naming each kind (a reference
# then adds kinds until it names one object).
KIND_PROBABILITY = {"size": 0.3, "color": 0.45, "material": 0.3, "shape": 0.5}
# Count questions name fewer kinds: broad descriptions reach the larger counts. At 1.0,
# "0" was 23% of count answers (2000 scenes); at 0.6 it is 18%.
COUNT_KINDS = 0.6
# The answer kept scores plan count + family count / FAMILY_WEIGHT: the plan's balance
# (what a question-only model could learn) first, then the family's.
FAMILY_WEIGHT = 4


class QuestionGenerator:
    """Balanced questions for a stream of scenes; the answer counts carry from scene to scene.

    The same seed and the same scenes in the same order give the same questions.
    """

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.by_plan: dict[tuple, Counter] = defaultdict(Counter)
        self.by_family: dict[str, Counter] = defaultdict(Counter)

    def questions(self, scene: dict, n: int) -> list[dict]:
        """n questions on the scene (fewer only where the scene allows fewer), the families in turn.

        Each: question, answer, family, answer_type, template, relation, program.
        """
        out, seen = [], set()
        start = self.rng.randrange(len(FAMILIES))
        for k in range(n):
            families = FAMILIES[(start + k) % len(FAMILIES):] + FAMILIES[:(start + k) % len(FAMILIES)]
            for family in families:  # the next families only where a scene cannot ask this one
                question = self._question(scene, family, seen)
                if question is not None:
                    out.append(question)
                    seen.add(question["question"])
                    break
        return out

    def _question(self, scene: dict, family: str, seen: set) -> dict | None:
        for _ in range(PLANS):
            template = self.rng.choice(FAMILY_TEMPLATES[family])
            plan = self._plan(template)
            key = (template.id, *sorted(plan.items()))
            counts = self.by_plan[key]
            candidates: dict[str, list] = {}
            found, least = 0, min(counts.values(), default=0)
            for _ in range(ATTEMPTS):
                slots = self._fill(template, plan, scene)
                if slots is None:
                    continue
                try:
                    answer = answer_text(execute(template.build(slots), scene))
                except Ambiguous:
                    continue
                candidates.setdefault(answer, []).append(slots)
                found += 1
                # Enough candidates, and one of them has an answer this plan has given least so far.
                if found == MAX_CANDIDATES or found >= CANDIDATES and min(counts[a] for a in candidates) <= least:
                    break
            if not candidates:
                continue
            # Rejection sampling: keep the answer this plan has given least (then this family).
            in_family = self.by_family[family]
            answer = min(candidates, key=lambda a: (counts[a] + in_family[a] / FAMILY_WEIGHT, self.rng.random()))
            slots = self.rng.choice(candidates[answer])
            text = render_text(self.rng.choice(template.texts), slots, self.rng)
            text = text[0].upper() + text[1:]
            if text in seen:
                continue
            self.by_plan[key][answer] += 1
            self.by_family[family][answer] += 1
            return {"question": text, "answer": answer, "family": family, "answer_type": ANSWER_TYPES[family],
                    "template": template.id, "relation": template.relation, "program": template.build(slots)}
        return None

    def _plan(self, template: Template) -> dict:
        """What the question's text fixes before its values: attribute names, kinds of free descriptions."""
        plan = {}
        for slot in template.slots:
            avoid = {plan[name] for name in slot.avoid}
            if slot.kind == "attr":
                kinds = [k for k in ATTRIBUTES if k not in avoid]
                weights = [len(ATTRIBUTES[k]) if slot.by_values else 1 for k in kinds]
                plan[slot.name] = self.rng.choices(kinds, weights)[0]
            elif slot.kind == "free":
                scale = COUNT_KINDS if template.family == "count" else 1
                while True:
                    kinds = tuple(k for k in ATTRIBUTES
                                  if k not in avoid and self.rng.random() < scale * KIND_PROBABILITY[k])
                    if (kinds or not slot.nonempty) and (not slot.specific or {"color", "shape"} & set(kinds)):
                        break
                plan[slot.name] = kinds
        return plan

    def _fill(self, template: Template, plan: dict, scene: dict) -> dict | None:
        """Random values for the plan's slots, or None where a reference cannot be made."""
        objects = scene["objects"]
        slots, chosen = {}, {}
        for slot in template.slots:
            if slot.kind in ("attr", "rel"):
                slots[slot.name] = plan[slot.name] if slot.kind == "attr" else self.rng.choice(RELATIONS)
                continue
            try:
                context = sorted(execute(slot.within(slots), scene)) if slot.within else range(len(objects))
            except Ambiguous:
                return None
            if slot.kind == "free":
                slots[slot.name] = self._free_description(plan[slot.name], [objects[i] for i in context])
                if any(slots[slot.name] == slots[name] for name in slot.distinct):
                    return None  # "more circles than circles"
                continue
            taken = {chosen[name] for name in slot.distinct}
            choices = [i for i in context if i not in taken]
            if slot.like and self.rng.random() < 0.5:
                kind, value = plan["A"], objects[chosen[slot.like]][plan["A"]]
                choices = [i for i in choices if objects[i][kind] == value] or choices
            if not choices:
                return None
            chosen[slot.name] = self.rng.choice(choices)
            avoid = {plan[name] for name in slot.avoid}
            slots[slot.name] = self._unique_description(objects, chosen[slot.name], context, avoid)
            if slots[slot.name] is None:
                return None
        return slots

    def _free_description(self, kinds: tuple, context: list) -> dict:
        """Half of the time the values of an object of `context`, else values that no object
        of it has (where some combination is missing): "yes" and "no", zero and nonzero,
        both come up. Either rule treats all values alike, so a text does not tell its answer."""
        if context and self.rng.random() < 0.5:
            source = self.rng.choice(context)
            return {k: source[k] for k in kinds}
        present = {tuple(o[k] for k in kinds) for o in context}
        for _ in range(8):  # most combinations are missing: a few draws find one
            values = tuple(self.rng.choice(ATTRIBUTES[k]) for k in kinds)
            if values not in present:
                break
        return dict(zip(kinds, values))

    def _unique_description(self, objects: list, target: int, context: list, avoid: set) -> dict | None:
        """A description of objects[target] that no other object of `context` fits (CLEVR's refinement)."""
        allowed = [k for k in ATTRIBUTES if k not in avoid]
        kinds = [k for k in allowed if self.rng.random() < KIND_PROBABILITY[k]]
        rest = [k for k in allowed if k not in kinds]
        obj = objects[target]
        rivals = [objects[i] for i in context if i != target]
        for kind in kinds:
            rivals = [o for o in rivals if o[kind] == obj[kind]]
        while rivals:  # name one more kind, at random, until no other object fits
            if not rest:
                return None
            kinds.append(rest.pop(self.rng.randrange(len(rest))))
            rivals = [o for o in rivals if o[kinds[-1]] == obj[kinds[-1]]]
        return {k: obj[k] for k in ATTRIBUTES if k in kinds}


def suggest_questions(scene: dict, n: int = 5, seed: int = 0) -> list[tuple[str, str]]:
    """n (question, answer) pairs about a scene, one family after another."""
    return [(q["question"], q["answer"]) for q in QuestionGenerator(seed).questions(scene, n)]
