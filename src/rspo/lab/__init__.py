"""Research tooling on top of the library: the stability study, the drift atlas, the gradient-variance
measurement, the demo, pretraining of the tiny testbed models, their presets, the character tokenizer
and plots. The library core imports nothing from here (``tests/test_architecture.py``)."""
