"""One module per block family: its deployed block class beside its gate placement and registration.

A new family is one more module here (its ``GateSpec``s, a ``_Deployed`` subclass and
``register_gated_block``), imported by :mod:`manidp.gating` so that importing the package registers it.
"""
