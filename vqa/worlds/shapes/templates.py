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

A scene is a dict as `scenes.random_scene` makes it: `objects` (shape, color, size,
material, pixel_coords, radius) and `relationships[rel][i]` = the objects that are `rel`
of object i. A pair closer than the relation margin along an axis is in neither list of
that axis; a relation question about such a pair is ambiguous and never asked or answered.
"""


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
VALUE_OF_WORD = {word: value for value, words in WORDS.items() for word in words}
KIND_OF_VALUE = {value: kind for kind, values in ATTRIBUTES.items() for value in values}


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

