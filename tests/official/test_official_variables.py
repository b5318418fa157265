"""The official ViLD variable lists and the seeded random weights used as a TF reference."""

import numpy as np

from reference.random_weights import CLASSIFIER_KEY, random_classifier, random_official_weights
from vild_d2.official import official_variables
from vild_d2.official.checkpoint.variables import _read_list


def test_r50_rule_matches_listed_graph():
    # The numbering rule reproduces the lists taken from the official TF graph, in order.
    for ensemble, count in ((False, 425), (True, 463)):
        listed = list(_read_list(ensemble))
        assert official_variables(50, ensemble) == listed
        assert len(listed) == count


def test_deeper_resnets():
    for depth, n_conv in ((101, 104), (152, 155)):
        names = [n for n, _ in official_variables(depth) if n.startswith(f"resnet{depth}/")]
        assert len(names) == 5 * n_conv
        assert f"resnet{depth}/conv2d_{n_conv - 1}/kernel" in names
        assert not any("_sim_clr" in n for n in names)
    shapes = dict(official_variables(152))
    assert shapes["resnet152/conv2d_154/kernel"] == (1, 1, 512, 2048)


def test_random_weights_deterministic_and_shaped():
    variables = official_variables(50)
    a = random_official_weights(variables, seed=3)
    b = random_official_weights(variables, seed=3)
    assert list(a) == [n for n, _ in variables]
    for name, shape in variables:
        assert a[name].shape == shape and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a[CLASSIFIER_KEY], random_classifier(3))
    # Pinned values: numpy's PCG64 stream must not change under us.
    np.testing.assert_allclose(
        a["resnet50/conv2d/kernel"].ravel()[:2], [0.23805764, -0.29809883], rtol=1e-5
    )
    var = a["fpn/p2-bn/moving_variance"]
    assert var.min() >= 0.5 and var.max() <= 1.5
