"""The comparison methods: static (L1, FPGM, SFP) and dynamic (channel gating, FBS).

Importing this package registers them in :data:`manidp.methods.METHODS`.
"""
