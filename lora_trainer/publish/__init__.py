"""Publishing stage: a finished run folder -> a HuggingFace Hub repo with a model card (hub.py,
card.py) or a CivitAI-ready zip (civitai.py). run.py reads the run; adapters.py writes both layouts."""
