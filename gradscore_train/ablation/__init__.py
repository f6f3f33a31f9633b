"""The ablation runner, one module per step of its flow:

``config`` (the grid and its budget) -> ``runs`` (training every run, resumable) -> ``assessment``
(every model assessed with the same seeds; ``population``: the perturbed exact scores the study adds)
-> ``study`` (rank correlations with bootstrap intervals) -> ``report`` (``report.md`` and its plots).
The command line is ``python -m gradscore_train.ablate`` (``gradscore_train/ablate.py``).
"""
