"""The laptop-scale convergence experiment (docs/convergence.md): ``run.py`` is the script, ``toy.py``
its toy encoder and evaluation networks. Experiment code: nothing under ``repa/`` imports it."""
