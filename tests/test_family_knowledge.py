"""Family knowledge lives in the zoo's family classes: naming, module categories, example inputs, features."""

import torch

from sensitivity import insights as I
from sensitivity.graph import example_inputs
from sensitivity.zoo import family_for_denoiser, get_family, list_families
from sensitivity.zoo.base import CLEAN_FID_INCEPTION, DIGITS_CLASSIFIER, ModelFamily
from sensitivity.zoo.naming import DIFFUSERS_NAMING, LayerNaming


# one family per example-input builder (sdxl shares sd15's, pixart-sigma pixart-alpha's)
BUILDERS = ("sd15", "pixart-alpha", "dit-xl-2", "hunyuan-dit", "digits-dit", "digits-unet")


def test_every_builder_family_builds_its_own_example_inputs():
    for name in BUILDERS:
        fam = get_family(name)
        den = fam.load_denoiser("meta")
        assert type(den).__name__ in family_for_denoiser(den).denoiser_class_names  # first family of its class
        mine = fam.example_inputs(den)
        via_graph = example_inputs(den)
        assert set(mine) == set(via_graph), name
        for k, v in mine.items():
            if isinstance(v, torch.Tensor):
                assert v.shape == via_graph[k].shape and v.dtype == via_graph[k].dtype, (name, k)


def test_feature_network_and_naming_are_family_attributes():
    assert get_family("digits-dit").feature_network == get_family("digits-unet").feature_network == DIGITS_CLASSIFIER
    assert get_family("sd15").feature_network == CLEAN_FID_INCEPTION
    assert all(get_family(n).layer_naming is DIFFUSERS_NAMING for n in list_families())
    name = "transformer_blocks.3.attn1.to_q"
    assert I.describe_layer(name, "pixart-alpha") == I.describe_layer(name) == DIFFUSERS_NAMING.describe(name)


def test_a_family_with_its_own_naming():
    class Toy(ModelFamily):
        name = "toy-test-family"
        layer_naming = LayerNaming(op_rules=((r"^mix$", "Mixer", "Mix"),) + DIFFUSERS_NAMING.op_rules,
                                   block_rules=((r"^(stages)\.(\d+)\.(.+)$", "flat"),))

    fam = Toy()
    info = fam.describe_layer("stages.2.mix")
    assert (info.block, info.block_rank, info.op_type, info.op_group) == ("2", 2, "Mixer", "Mix")
    assert I.describe_layer("stages.2.mix", fam).op_type == "Mixer"
    assert I.describe_layer("stages.2.mix").block == "other"  # the diffusers rules do not know it
