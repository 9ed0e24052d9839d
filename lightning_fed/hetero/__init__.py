"""Vertical federated learning (HeteroNN): sample alignment, split learning.

:mod:`.psi` aligns the parties' samples by private set intersection, and
:mod:`.order` gives every party the same split and batch order of the common IDs.
"""
