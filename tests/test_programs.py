"""vqa/programs.py: side-loss targets from a question's program, or from its words."""

from vqa.programs import program_nodes, program_targets, question_targets, side_target_vocabulary, word_targets
from vqa.worlds.shapes.questions import parse_question
from vqa.worlds.shapes.templates import execute

# "Are there more red circles left of the small square than outline things?"
NESTED = ("greater_than", None,
          ("count", None, ("filter_shape", "circle", ("filter_color", "red",
                                                      ("relate", "left", ("unique", None, ("filter_shape", "square", ("filter_size", "small", ("scene", None)))))))),
          ("count", None, ("filter_material", "outline", ("scene", None))))


def test_nested_programs_become_clevr_node_lists_inputs_first():
    nodes = program_nodes(NESTED)
    assert [n["function"] for n in nodes] == [
        "scene", "filter_size", "filter_shape", "unique", "relate", "filter_color", "filter_shape", "count",
        "scene", "filter_material", "count", "greater_than"]
    assert nodes[-1]["inputs"] == [7, 10] and nodes[4]["value_inputs"] == ["left"]
    assert all(i < k for k, n in enumerate(nodes) for i in n["inputs"])


def test_targets_name_each_reference_the_relation_and_the_functions():
    assert program_targets(program_nodes(NESTED)) == [
        "ref0.size=small", "ref0.shape=square", "ref1.relate=left", "ref1.color=red", "ref1.shape=circle",
        "fn=count", "ref2.material=outline", "fn=count", "fn=greater_than"]


def test_clevr_files_own_spelling_is_read_too():
    # CLEVR v1.0 questions name nodes by "type" with "side_inputs" in some releases.
    clevr = [{"type": "scene", "inputs": [], "side_inputs": []},
             {"type": "filter_color", "inputs": [0], "side_inputs": ["cyan"]},
             {"type": "same_shape", "inputs": [1], "side_inputs": []},
             {"type": "query_material", "inputs": [2], "side_inputs": []}]
    assert program_targets(clevr) == ["ref0.color=cyan", "ref1.same_shape", "fn=query_material"]


def test_the_generators_questions_get_their_own_programs_targets():
    scene = {"objects": [{"shape": "circle", "color": "red", "size": "large", "material": "solid",
                          "pixel_coords": [20, 20]}], "relationships": {r: [[]] for r in ("left", "right", "above", "below")}}
    template, slots = parse_question("What color is the large circle?")
    program = template.build(slots)
    assert execute(program, scene) == "red"
    assert program_targets(program_nodes(program)) == ["ref0.size=large", "ref0.shape=circle", "fn=query_color"]


def test_without_a_program_the_words_are_the_targets():
    assert word_targets("What colour is the café's CUP? cup 2") == [
        "word=what", "word=colour", "word=is", "word=the", "word=café", "word=s", "word=cup"]
    assert question_targets({"question": "Is it red?"}) == ["word=is", "word=it", "word=red"]
    assert question_targets({"question": "Is it red?", "program": program_nodes(("exist", None, ("scene", None)))}) \
        == ["fn=exist"]


def test_vocabulary_keeps_frequent_targets_most_frequent_first():
    records = [{"question": "is it red"}] * 6 + [{"question": "is it blue"}] * 5 + [{"question": "rare"}] * 4
    assert side_target_vocabulary(records, min_count=5) == ["word=is", "word=it", "word=red", "word=blue"]
    assert side_target_vocabulary(records, max_targets=2, min_count=1) == ["word=is", "word=it"]
