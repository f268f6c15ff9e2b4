"""The comparison methods: static (L1, FPGM, SFP) and dynamic (channel gating, FBS).

Each registers through the ``manidp.methods`` entry-point group in
pyproject.toml (nothing here imports them); each method's card is in
``baselines/README.md``.
"""
