"""Tests for bbb.models: LeNet's shapes, the compute dtype of every layer (bfloat16 hidden layers,
a float32 output layer), dropout on in training only, and make_model passing each field on."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bbb import models
from tests.conftest import all_equations

pytestmark = pytest.mark.usefixtures("fast_compile")


def _products(jaxpr) -> list[tuple[str, str, tuple[int, ...]]]:
    """(primitive, operand dtype, output shape) of every dot and convolution in `jaxpr`."""
    return [
        (eqn.primitive.name, str(eqn.invars[0].aval.dtype), tuple(eqn.outvars[0].aval.shape))
        for eqn in all_equations(jaxpr)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated")
    ]


def test_lenet_pools_twice_by_two_with_same_padding():
    """28×28 inputs, 'SAME' 5×5 convolutions and 2×2 pools of stride 2: the first dense layer
    takes 7 · 7 · features[-1] inputs (28 → 14 → 7)."""
    model = models.LeNet(features=(2, 3), hidden_sizes=(4,), num_outputs=5)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert shapes["Conv_0"]["kernel"].shape == (5, 5, 1, 2)
    assert shapes["Conv_1"]["kernel"].shape == (5, 5, 2, 3)
    assert shapes["Dense_0"]["kernel"].shape == (7 * 7 * 3, 4)
    assert shapes["Dense_1"]["kernel"].shape == (4, 5)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_bfloat16_models_compute_hidden_layers_in_bfloat16_and_the_output_in_float32(name):
    """dtype=bfloat16: every hidden convolution and matmul takes bfloat16 operands; the output
    layer's (the only product whose output has num_outputs = 5 columns) takes float32, and so
    is the output. With dtype=None every product is float32."""
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)
    kwargs = dict(hidden_sizes=(4,), num_outputs=5)
    if name == "lenet":
        kwargs["features"] = (2, 3)
    found = {}
    for dtype in (None, jnp.bfloat16):
        model = models.MODELS[name](**kwargs, dtype=dtype)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        jaxpr = jax.make_jaxpr(lambda p, m=model: m.apply({"params": p}, x))(params)
        assert jaxpr.out_avals[0].dtype == jnp.float32
        found[dtype] = _products(jaxpr.jaxpr)
    assert {dtype for _, dtype, _ in found[None]} == {"float32"}
    hidden = [(p, d) for p, d, shape in found[jnp.bfloat16] if shape[-1] != 5]
    last = [(p, d) for p, d, shape in found[jnp.bfloat16] if shape[-1] == 5]
    assert last == [("dot_general", "float32")], found[jnp.bfloat16]
    expected = {("dot_general", "bfloat16")}
    if name == "lenet":
        expected.add(("conv_general_dilated", "bfloat16"))
    assert set(hidden) == expected, found[jnp.bfloat16]
    assert len(hidden) == (3 if name == "lenet" else 1)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_dropout_is_on_in_training_and_off_at_evaluation(name):
    """train=False: the same output whatever the dropout key, the network without dropout's;
    train=True: the masks change the output."""
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    kwargs = dict(hidden_sizes=(16,), num_outputs=5)
    if name == "lenet":
        kwargs["features"] = (4, 4)
    plain = models.MODELS[name](**kwargs)
    dropout = models.MODELS[name](**kwargs, dropout_rate=0.5)
    params = plain.init(jax.random.key(0), x)["params"]

    def run(model, train, seed):
        return np.asarray(
            model.apply({"params": params}, x, train=train, rngs={"dropout": jax.random.key(seed)})
        )

    reference = run(plain, False, 0)
    for seed in (1, 2):
        np.testing.assert_allclose(run(dropout, False, seed), reference, rtol=1e-6, atol=1e-7)
    on = [run(dropout, True, seed) for seed in (1, 2)]
    assert np.max(np.abs(on[0] - on[1])) > 1e-3
    assert np.max(np.abs(on[0] - reference)) > 1e-3


def test_make_model_passes_every_field_on():
    """Each config field reaches the module: name, sizes, activation, dropout, dtype, features."""
    config = ml_collections.ConfigDict(
        dict(
            name="lenet",
            hidden_sizes=(7,),
            num_outputs=3,
            activation="tanh",
            dropout_rate=0.25,
            dtype="bfloat16",
            features=(2, 5),
        )
    )
    model = models.make_model(config)
    assert isinstance(model, models.LeNet)
    assert (model.hidden_sizes, model.num_outputs, model.activation) == ((7,), 3, "tanh")
    assert (model.dropout_rate, model.dtype, model.features) == (0.25, jnp.bfloat16, (2, 5))
    config.name, config.dtype = "mlp", "float32"
    del config.features
    model = models.make_model(config)
    assert isinstance(model, models.MLP) and model.dtype is None


@pytest.mark.parametrize("features", [(True, 4), (0, 4), (2.5, 4)])
def test_make_model_refuses_bad_conv_features(features):
    """model.features are channel counts: a bool (True is an int in Python), 0 or a float is
    refused naming the field, as hidden_sizes' check does."""
    config = ml_collections.ConfigDict(
        dict(name="lenet", hidden_sizes=(4,), num_outputs=3, activation="relu", dropout_rate=0.0)
    )
    config.features = features
    with pytest.raises(models.ConfigError, match=r"model\.features"):
        models.make_model(config)
