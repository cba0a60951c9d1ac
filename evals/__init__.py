"""Evaluation of circuit-discovery methods.

* :mod:`evals.faithfulness`: faithfulness curves over circuit sizes, CPR / CMD (MIB, Mueller et al. 2025),
  KL to the full model, random-circuit baseline; all masks through one ``EdgePatcher``.
* :mod:`evals.ground_truth`: exact ROC curves / AUC of a method's scores against a reference circuit.
* :mod:`evals.references`: reference circuits (the measured induction circuit; tracr circuits).
* :mod:`evals.tracr_models`, :mod:`evals.tracr_circuits`: tracr-compiled models as bridges, their exact
  circuits and tasks (optional extra ``circuitexplain[tracr]``).
* :mod:`evals.run`, :mod:`evals.plots`, :mod:`evals.cli`: ``circuitexplain eval circuits``.

Submodules are imported on demand (torch, matplotlib and JAX are heavy).
"""
