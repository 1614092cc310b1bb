"""Reading and writing shapes-world questions: template texts filled and parsed back, the true
answer of a free question, and the balanced generator."""

import html
import random
import re
from collections import Counter, defaultdict

from .templates import (ALSO_ACCEPTED, ANSWER_TYPES, ATTRIBUTES, FAMILIES, FAMILY_TEMPLATES, KIND_OF_VALUE,
                        RELATION_WORDS, RELATIONS, TEMPLATES, THING_WORDS, VALUE_OF_WORD, WORDS, Ambiguous, Template,
                        answer_text, execute)

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


_ADJECTIVE = _alternation(w for v, ws in WORDS.items() if KIND_OF_VALUE[v] != "shape" for w in ws)
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
    if noun not in VALUE_OF_WORD and noun not in THING_WORDS:
        noun = noun[:-1]  # plural
    description = {} if noun in THING_WORDS else {"shape": VALUE_OF_WORD[noun]}
    for word in adjectives:
        value = VALUE_OF_WORD[word]
        if KIND_OF_VALUE[value] in description:
            return None
        description[KIND_OF_VALUE[value]] = value
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


def verdict(scene: dict, question: str, model_answer: str) -> str:
    """The scene builder's line (markdown) on a model's answer: the true answer and whether the model
    got it, or why the scene has none."""
    truth, reason = answer_or_reason(scene, question)
    if reason == AMBIGUOUS:
        return ("True answer: unknown: the question names an object that is not unique in this scene "
                "(or a relation the margin leaves open).")
    if truth is None:
        return "True answer: unknown (the question matches none of the world's templates; try a suggested one)."
    return f"True answer: **{html.escape(truth)}**. The model is **{'right' if model_answer == truth else 'wrong'}**."


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
