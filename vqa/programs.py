"""What a question names, as side-loss targets for its vector (training only).

Trained on answers alone, the LSTM is slow to learn what a question names: on a perfect
8x8 grid of object labels, single-hop questions stayed at 45.6 % after 8 short epochs, and
reached 97.8 % with the same LSTM told, by a side loss, which attribute values the question
names (issue "Models that learn their world"). The targets come from the question's program
where the data has one (CLEVR's `program`, which the shapes world also writes), else from
its words. They are strings, multi-hot per question:

- `ref{k}.{attribute}={value}`: object reference k (numbered in program order: a new
  reference starts at each `scene`, `relate` and `same_*`) is filtered on that value;
- `ref{k}.relate={relation}` and `ref{k}.{same_attribute}`: reference k is the objects
  related to the one before it;
- `fn={function}` for the other functions (count, exist, query_color, greater_than, ...),
  which also name the family;
- without a program, `word={w}` for each word of the question.

A program is CLEVR's list of nodes, each {"function" (or "type"), "inputs": [node indices],
"value_inputs" (or "side_inputs"): [...]}, every input before its node.
"""

import re
from collections import Counter

MAX_REFERENCES = 6  # references past this share the last number: no question here names more
_WORD = re.compile(r"[^\W\d_]+")


def program_nodes(program: tuple) -> list[dict]:
    """A nested (function, side_input, *inputs) program as CLEVR's node list (inputs first)."""
    nodes: list[dict] = []

    def visit(node: tuple) -> int:
        inputs = [visit(child) for child in node[2:]]
        nodes.append({"function": node[0], "inputs": inputs,
                      "value_inputs": [] if node[1] is None else [node[1]]})
        return len(nodes) - 1

    visit(program)
    return nodes


def program_targets(program: list[dict]) -> list[str]:
    """The side targets of a CLEVR-format program (see the module docstring)."""
    targets, reference, next_reference = [], [], 0
    for node in program:
        function = node.get("function") or node.get("type") or ""
        values = node.get("value_inputs") or node.get("side_inputs") or []
        inputs = node.get("inputs") or []
        inherited = reference[inputs[0]] if inputs and inputs[0] < len(reference) else 0
        if function == "scene" or function.startswith(("relate", "same_")):
            ref = min(next_reference, MAX_REFERENCES - 1)
            next_reference += 1
            if function.startswith("relate"):
                targets += [f"ref{ref}.relate={value}" for value in values]
            elif function != "scene":
                targets.append(f"ref{ref}.{function}")
        else:
            ref = inherited
            if function.startswith("filter_") and values:
                targets += [f"ref{ref}.{function[len('filter_'):]}={value}" for value in values]
            elif function not in ("unique", "union", "intersect", ""):
                targets.append(f"fn={function}")
        reference.append(ref)
    return targets


def word_targets(question: str) -> list[str]:
    return [f"word={w}" for w in dict.fromkeys(_WORD.findall(question.lower()))]


def question_targets(record: dict) -> list[str]:
    """A record's side targets: from its program where it has one, else from its words."""
    program = record.get("program")
    if isinstance(program, list) and program:
        return program_targets(program)
    return word_targets(record["question"])


def side_target_vocabulary(records, max_targets: int = 1000, min_count: int = 5) -> list[str]:
    """The targets of at least `min_count` training questions, most frequent first (ties by name), at most `max_targets`."""
    counts = Counter(t for r in records for t in set(question_targets(r)))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # ties by name: the same every run
    return [t for t, n in ranked[:max_targets] if n >= min_count]


# ------------------------------------------------------------- where each step of a program looks
def _set_value(function: str, values: list, inputs: list, scene: dict):
    """The objects (a frozenset of indices) a set-valued node selects, or None where it is not one."""
    objects = scene["objects"]
    if function == "scene":
        return frozenset(range(len(objects)))
    if function.startswith("filter_") and values and inputs and isinstance(inputs[0], frozenset):
        kind = function[len("filter_"):]
        return frozenset(i for i in inputs[0] if objects[i].get(kind) == values[0])
    if function == "unique" and inputs and isinstance(inputs[0], frozenset):
        return inputs[0] if len(inputs[0]) == 1 else None
    if function.startswith("relate") and values and inputs and isinstance(inputs[0], frozenset) and len(inputs[0]) == 1:
        (obj,) = inputs[0]
        related = scene.get("relationships", {}).get(values[0])
        return frozenset(related[obj]) if related is not None and obj < len(related) else None
    if function.startswith("same_") and inputs and isinstance(inputs[0], frozenset) and len(inputs[0]) == 1:
        (obj,) = inputs[0]
        kind = function[len("same_"):]
        return frozenset(j for j, o in enumerate(objects) if j != obj and o.get(kind) == objects[obj].get(kind))
    if function in ("union", "intersect") and len(inputs) == 2 and all(isinstance(s, frozenset) for s in inputs):
        return inputs[0] | inputs[1] if function == "union" else inputs[0] & inputs[1]
    return None


def referred_sets(program: list[dict], scene: dict) -> list[tuple[frozenset, bool]] | None:
    """The sets of objects a CLEVR-format program looks at, in the order it looks, each with
    whether the answer is read from it.

    Run on a CLEVR-format scene (`objects` with attributes, `relationships[relation][i]`), a
    set counts when a step other than a filter reads it: the object a `unique` picks, the set
    that `relate`, `same_*` or `union` takes (an anchor), or that `count`, `exist` or `query_*`
    takes (an answer set); the same set read twice in a row counts once. "How many red things
    are left of the blue square?" looks at the square, then at the red things left of it (the
    answer set). None where the program does not run on the scene (a reference that is not
    unique, an unknown function): such a question gets no target.
    """
    values: list = []
    looked: list[tuple[frozenset, bool]] = []
    for node in program:
        function = node.get("function") or node.get("type") or ""
        inputs = [values[i] if isinstance(i, int) and 0 <= i < len(values) else None for i in node.get("inputs") or []]
        side = node.get("value_inputs") or node.get("side_inputs") or []
        if not function.startswith("filter_"):
            answer = function in ("count", "exist") or function.startswith("query_")
            for s in inputs:
                if isinstance(s, frozenset):
                    if looked and looked[-1][0] == s:
                        looked[-1] = (s, looked[-1][1] or answer)
                    else:
                        looked.append((s, answer))
        value = _set_value(function, side, inputs, scene)
        if value is None and (function in ("scene", "unique", "union", "intersect")
                              or function.startswith(("filter_", "relate", "same_"))):
            return None  # a set step that does not run here
        values.append(value)
    return looked or None


def hop_sets(looked: list[tuple[frozenset, bool]], hops: int) -> list[frozenset]:
    """Which set each of `hops` attention hops should look at (`looked` as `referred_sets` gives
    it): the answer sets, the last hop on the last; more answer sets than hops: the first and
    the last, spread evenly between; fewer: the anchors just before the first answer set go
    first ("left of the square": the square, then the things left of it), else the first repeats."""
    answers = [s for s, is_answer in looked if is_answer] or [looked[-1][0]]
    if len(answers) >= hops:
        return [answers[round(k * (len(answers) - 1) / (hops - 1))] for k in range(hops)] if hops > 1 else answers[-1:]
    first = next(n for n, (s, is_answer) in enumerate(looked) if is_answer or n == len(looked) - 1)
    anchors = [s for s, _ in looked[:first]][-(hops - len(answers)):] if first else []
    chosen = anchors + answers
    return [chosen[0]] * (hops - len(chosen)) + chosen
