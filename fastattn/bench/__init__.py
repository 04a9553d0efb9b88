"""The benchmark suite, ``python -m fastattn.bench`` (see ``__main__`` for the options).

One module per op (attention, decode, layer_norm, int8, model) lists the cases to time, built
from ``cases`` (the case model and work formulas). ``harness`` runs each case, timing its
implementations against PyTorch's own in the same run with ``timing``; ``report`` validates and
writes the results (terminal table, results.json, results.md, plots).
"""
