"""Countermeasures: what a data user may do to a published set before training (``mme attack``)."""
