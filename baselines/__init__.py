"""The comparison methods: static (L1, FPGM, SFP) and dynamic (channel gating, FBS).

Importing this package registers them in :data:`manidp.methods.METHODS`; each
method's card is in ``baselines/README.md``.
"""
from baselines import channel_gating, fbs, l1, soft_pruning  # noqa: F401  (registration)
