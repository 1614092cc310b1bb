"""The shapes world: a procedural 2D CLEVR with scene graphs and question programs.

- `scenes`: the world's sizes (WorldConfig), random scene graphs, the rows of the app's table;
- `render`: a scene graph drawn as pixels;
- `templates`: the vocabulary, the functional programs and the question templates;
- `questions`: template texts filled and parsed back, true answers, the balanced generator;
- `files`: a split written in the VQA v2 layout, and the checksummed cache of the built-in splits.

The world only writes files and returns their folder; `vqa.worlds.registry` reads them.
The names below are the whole API, so that callers need one import.
"""

from .files import builtin_scene_files, cache_root, generate_scenes, shapes_world_folder, split_files, write_split
from .questions import suggest_questions, true_answer, verdict
from .render import render_scene
from .scenes import COLORS, SPLITS, WorldConfig, compute_relationships, random_scene, scene_from_rows, scene_to_rows

__all__ = ["WorldConfig", "random_scene", "render_scene", "compute_relationships", "scene_to_rows",
           "scene_from_rows", "suggest_questions", "true_answer", "verdict", "generate_scenes", "write_split",
           "split_files", "builtin_scene_files", "shapes_world_folder", "cache_root", "COLORS", "SPLITS"]
