"""gradscore_train: the training driver, a thin accelerate loop over the gradscore library.

The library (``gradscore``) never imports this package. Flow of one run: ``config`` (YAML schema,
validation, overrides) -> ``data`` (toy mixtures, digits, image sets) and ``build`` (process, models,
objective from a config; ``load_trained``) -> ``loop`` (``run(config, output_dir) -> metrics``, with
``checkpoint``, ``ema``, ``logbook``) -> ``evaluation`` (samples, diagnostics in training, sample
quality). Command lines: ``train`` (one run), ``ablate`` (a grid of runs, see ``ablation/``),
``diagnose`` (a trained checkpoint's error decomposition).
"""
