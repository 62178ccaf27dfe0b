"""Inside any finished run: per-example predictions, attributions, and where each method
changed the network (docs/inside.md).

* :mod:`.examples` — every test image's prediction per run (stored by the run's test phase,
  or recomputed from its weights and kept), and the drill-down's filters;
* :mod:`.attributions` — captum's Integrated Gradients on the input and on the patch tokens
  above a block, attention rollout, and captum's infidelity and max-sensitivity;
* :mod:`.network` — per-layer CKA between the frozen backbone and each tuned model
  (:mod:`.cka`), CLS features before and after tuning in 2-D, linear separability per layer;
* :mod:`.models` — the models and images these measure (rebuilt from the run, never
  downloaded);
* :mod:`.records` — where the computed records are kept (with the run, or in the user cache
  for a read-only store) and how a stale one is recognised.

The measurements on a model (tokens per layer, the network above a block, rollout) are
probes: :mod:`vpeft_viz.probes.representations`, :mod:`vpeft_viz.probes.attention`.
"""
