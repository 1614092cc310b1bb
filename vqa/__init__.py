"""The VQA library: Antol et al. 2015's CNN + LSTM fused by elementwise product, and everything
around it.

Start at `model.py` (the one forward path) and `config.py` (every option). Data flows
`records.py` (the VQA v2 layout) -> `batching.py` -> `trainer.py` (transformers.Trainer) ->
`card.py` (the measured checkpoint); `evaluation.py` and `metrics.py` score with the official
metric; `predict.py` answers one image for the app. `worlds/` holds the built-in datasets,
`reliability/` whether an answer should be trusted; `download.py`, `hf_parquet.py` and
`pipeline.py` take VQA v2 from nothing to a results file. README.md's Layout lists every module.
"""
