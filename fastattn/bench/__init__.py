"""The benchmark suite, ``python -m fastattn.bench`` (see ``__main__`` for the options).

One module per op (attention, decode, layer_norm, int8, model) lists the cases to time; the
shared harness (``harness``) times them against PyTorch's own implementations in the same run and
writes the results (terminal table, results.json, results.md, plots).
"""
