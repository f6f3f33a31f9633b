"""The gradscore training driver: a thin accelerate loop over the library (see train/loop.py).

Modules: ``config`` (YAML schema, validation, overrides), ``data`` (toy mixtures, digits, image
sets), ``build`` (process, model, objective, critic from a config; ``load_trained``), ``checkpoint``
(atomic save / resume), ``ema``, ``report`` (samples, diagnostics, sample quality), ``loop``
(``run(config, output_dir) -> metrics``), ``train.py`` (the command line).
"""
