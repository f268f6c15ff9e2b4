"""``dense``: the unpruned backbone trained with the shared recipe.

Every other method is measured against it and usually fine-tunes from its
checkpoint (``init_from``), so all rows of a table share one baseline.
"""
from manidp.methods._base import Method


class Dense(Method):
    name = "dense"
    paper_names = ("Baseline",)
