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
