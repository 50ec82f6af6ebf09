"""Expression search by reinforcement learning (Grid Search Network): the expression grammar and the controller.

The same search finds an elementwise embedding transform (variable ``x``) and an SVM kernel (pairwise variables
``dot``, ``l2sq``, ``l1``, ``cosine``); see :mod:`retrieval_core.rl.expressions` and
:mod:`retrieval_core.rl.controller`.
"""
