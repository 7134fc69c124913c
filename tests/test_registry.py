"""The drafter registry: every drafter file registers its own name and options; specs are checked against them."""

import pytest

from specdec.drafters import DRAFTER_NAMES, DrafterSpec, Option, build_drafter, register
from specdec.drafters.registry import REGISTRY


def test_every_shipped_drafter_is_registered_by_its_own_file():
    assert set(DRAFTER_NAMES) >= {"none", "ngram", "draft-model", "self", "medusa", "eagle"}
    assert REGISTRY["ngram"].build.__module__ == "specdec.drafters.ngram"
    assert REGISTRY["eagle"].build.__module__ == "specdec.drafters.eagle"


def test_a_bad_option_value_names_the_option_and_the_expected_type():
    with pytest.raises(ValueError, match="option 'depth' of drafter 'ngram' expects an integer, got 'abc'"):
        DrafterSpec.parse("ngram:depth=abc")


def test_an_unknown_option_lists_only_that_drafters_own_options():
    with pytest.raises(ValueError) as err:
        DrafterSpec.parse("ngram:layers=3")
    assert "'layers=3' for drafter 'ngram'" in str(err.value)
    assert "['depth', 'budget', 'min_ngram', 'max_ngram', 'store'" in str(err.value) and "topk" not in str(err.value)
    with pytest.raises(ValueError, match="'none': it takes no options"):
        DrafterSpec.parse("none:depth=2")
    with pytest.raises(ValueError, match="unknown drafter 'medusa2'; choose one of"):
        DrafterSpec.parse("medusa2")


def test_defaults_apply_only_where_the_drafter_has_the_option_and_the_string_wins():
    spec = DrafterSpec.parse("self:depth=3", layers=4, depth=7, topk=None, path="/unused")
    assert spec.options["layers"] == 4 and spec.options["depth"] == 3 and "path" not in spec.options
    assert DrafterSpec.parse("ngram", tree="dynamic").tree is None  # ngram has no tree option


def test_a_missing_head_checkpoint_path_is_named(tiny_target, tmp_path):
    with pytest.raises(ValueError, match=f"medusa:path={tmp_path}/nope does not exist"):
        build_drafter(DrafterSpec.parse(f"medusa:path={tmp_path}/nope"), tiny_target)


def test_a_new_drafter_registers_without_editing_any_other_file(tiny_target):
    @register("test-constant", help="test only", options=(Option("depth", int, 2, "tokens"),))
    def build(target, depth):
        from specdec.drafters import NgramDrafter

        return NgramDrafter(max_depth=depth)

    try:
        drafter = build_drafter(DrafterSpec.parse("test-constant:depth=5"), tiny_target)
        assert drafter.max_depth == 5
        with pytest.raises(ValueError, match="registered twice"):
            register("test-constant")(build)
    finally:
        del REGISTRY["test-constant"]
