"""The built-in worlds, datasets that need no download: `registry` names them (splits, loader,
palette, scene builder), `easy_vqa` reads the PyPI package's one-shape images, and `shapes`
generates the multi-object shapes world (a 2D CLEVR with scene graphs and programs). A world
makes files and records; reading the VQA v2 layout is `vqa.records`' job alone."""
