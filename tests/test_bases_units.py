"""Unit ids: one parser for short and full ids, round trips, one-line errors."""

import pytest

from explainers.units import UnitId, hook_long, hook_short, parse_unit_id


@pytest.mark.parametrize("hook,short", [
    ("blocks.3.hook_resid_pre", "3.resid_pre"), ("blocks.0.mlp.hook_post", "0.mlp.post"),
    ("blocks.12.attn.hook_z", "12.attn.z"), ("blocks.1.hook_mlp_out", "1.mlp_out"),
    ("ln_final.hook_in", "ln_final.in"), ("hook_embed", "embed"),
])
def test_hook_short_round_trip(hook, short):
    assert hook_short(hook) == short
    assert hook_long(short) == hook


@pytest.mark.parametrize("s,kind,layer,index,hook", [
    ("m0.n5", "neuron", 0, 5, "blocks.0.mlp.hook_post"),
    ("a1.h2", "head", 1, 2, "blocks.1.attn.hook_z"),
    ("f1.17@1.resid_post", "feature", 1, 17, "blocks.1.hook_resid_post"),
    ("d4.0@4.mlp.post", "direction", 4, 0, "blocks.4.mlp.hook_post"),
    ("err@2.resid_pre", "error", 2, None, "blocks.2.hook_resid_pre"),
])
def test_parse_short_ids(s, kind, layer, index, hook):
    u = parse_unit_id(s)
    assert (u.kind, u.layer, u.index, u.hook, u.model, u.basis) == (kind, layer, index, hook, "", "")
    assert u.short == s == str(u)
    assert parse_unit_id(u.full) == u


def test_full_id_round_trip():
    u = parse_unit_id("ioi-2l:topk-512:f1.17@1.resid_post")
    assert (u.model, u.basis, u.kind, u.index) == ("ioi-2l", "topk-512", "feature", 17)
    assert str(u) == "ioi-2l:topk-512:f1.17@1.resid_post"
    assert parse_unit_id("ioi-2l::m0.n5") == UnitId("neuron", 0, 5, "blocks.0.mlp.hook_post", "", "ioi-2l")
    # a model name with a colon-free path is fine; the short id is always the last part
    assert parse_unit_id("/tmp/models/x:b:a0.h1").model == "/tmp/models/x"
    assert UnitId.from_dict(u.to_dict()) == u


@pytest.mark.parametrize("s,msg", [
    ("m0n5", "not understood"),
    ("f1.3@2.resid_post", "must be in block 1"),
    ("f1.3@", "not understood"),
    ("x:y:z:m0.n1", "letters, digits"),
    ("", "non-empty"),
])
def test_bad_ids_one_line_errors(s, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_unit_id(s)
    assert "\n" not in str(e.value)


def test_unit_id_validates_hooks():
    with pytest.raises(ValueError, match="read at blocks.0.mlp.hook_post"):
        UnitId("neuron", 0, 1, "blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="needs an index"):
        UnitId("feature", 0, None, "blocks.0.hook_resid_post")
