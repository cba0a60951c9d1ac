"""evals.explain_run.needed_hooks: a circuit's store holds only the hooks of the nodes whose units fit in
--max-units (plan_units takes units node by node and cuts the list there)."""

from __future__ import annotations

from evals.explain_run import Selection, needed_hooks


def test_hooks_stop_once_max_units_are_covered():
    sel = Selection(("m0", "a1.h2", "m3.n5", "a4.h0", "m5"), ())
    every = needed_hooks("neuron", sel, None, None)
    assert every == sorted({"blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.3.mlp.hook_post",
                            "blocks.4.attn.hook_z", "blocks.5.mlp.hook_post"})
    # m0 gives 3 neurons, a1.h2 one: 4 units cover max_units 4
    assert needed_hooks("neuron", sel, None, None, per_node=3, max_units=4) == [
        "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    # a neuron node counts 0 (it may repeat one of m3's top neurons), so a4.h0 is still needed for 5
    assert needed_hooks("neuron", sel, None, None, per_node=3, max_units=5) == [
        "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.3.mlp.hook_post", "blocks.4.attn.hook_z"]
    # directions: every node counts 1 (a head may have fewer PCA directions than per_node)
    assert needed_hooks("direction", sel, None, None, per_node=3, max_units=2) == [
        "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"]
    # explicit units: no cut; a basis: its hook only
    sel2 = Selection(("m0", "m5"), ("a1.h2",))
    assert needed_hooks("neuron", sel2, None, None, per_node=3, max_units=1) == sorted(
        {"blocks.0.mlp.hook_post", "blocks.5.mlp.hook_post", "blocks.1.attn.hook_z"})
    assert needed_hooks("feature", sel, None, "blocks.2.hook_resid_post", per_node=3, max_units=1) == [
        "blocks.2.hook_resid_post"]
