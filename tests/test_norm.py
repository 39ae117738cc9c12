"""Normalisation under torch.func: exact layers, the canary on PyTorch's kernels, and meta-gradients through every
model and batch-norm mode (vmap == loop == float64 central difference)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from meta_gradcheck import (
    assert_every_tensor_matches_central_differences,
    assert_first_order_matches_frozen_inner_gradients,
    assert_vmap_equals_loop,
)
from torch import nn
from torch.func import grad, vmap

from metagrad.algorithms import MAML, MAMLEnhanced, MetaSGD, Reptile
from metagrad.inner import LSLR, SGD, Adam, Chain, Curvature
from metagrad.models import norm
from metagrad.models.conv4 import Conv4, PerStepBatchNorm2d
from metagrad.tasks import TaskBatch

F64 = torch.float64


# ----- the defect, on one layer ------------------------------------------------------------------------------
# L_i(w, a) = Σ c_i · norm(x_i · a; weight=w); the derivative d/da Σ_i <u, ∂L_i/∂w> computed with vmap over i
# against a plain loop over i and a float64 central difference.


def _second_order(layer, vectorize: bool, a: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    b, n, c, h = 3, 4, 2, 3
    x = torch.randn(b, n, c, h, h, generator=g, dtype=F64)
    coef = torch.randn(b, n, c, h, h, generator=g, dtype=F64)
    u = torch.randn(c, generator=g, dtype=F64)
    w = torch.rand(c, generator=g, dtype=F64) + 0.5
    a = torch.rand(c, generator=g, dtype=F64) + 0.5 if a is None else a

    def loss(w, a, xi, ci):
        return (ci * layer(xi * a[:, None, None], w)).sum()

    def inner(a, xi, ci):
        return (grad(loss)(w, a, xi, ci) * u).sum()

    def outer(a):
        if vectorize:
            return vmap(inner, in_dims=(None, 0, 0))(a, x, coef).sum()
        return sum(inner(a, x[i], coef[i]) for i in range(b))

    return outer, a


PYTORCH_LAYERS = {
    "F.batch_norm": lambda x, w: F.batch_norm(x, None, None, w, None, training=True),
    "F.instance_norm": lambda x, w: F.instance_norm(x, weight=w),
    "F.layer_norm": lambda x, w: F.layer_norm(x.transpose(1, 3), (x.shape[1],), w).transpose(1, 3),
}


def _exact_layer(kind: str):
    def layer(x, w):
        if kind == "F.batch_norm":
            m = norm.BatchNorm2d(x.shape[1], affine=False, track_running_stats=False)
            return m(x) * w[:, None, None]
        if kind == "F.instance_norm":
            return norm.InstanceNorm2d(x.shape[1])(x) * w[:, None, None]
        m = norm.LayerNorm(x.shape[1], elementwise_affine=False)
        return (m(x.transpose(1, 3)) * w).transpose(1, 3)

    return layer


@pytest.mark.parametrize("kind", list(PYTORCH_LAYERS))
def test_canary_pytorch_norm_kernels_are_still_wrong_under_vmap_of_grad_of_grad(kind):
    """Fails the day PyTorch fixes its kernel: metagrad's exact layers (models/norm.py) may then go."""
    f_vmap, a = _second_order(PYTORCH_LAYERS[kind], True)
    f_loop, _ = _second_order(PYTORCH_LAYERS[kind], False)
    wrong = (grad(f_vmap)(a) - grad(f_loop)(a)).abs().max()
    assert wrong > 1e-3, f"PyTorch's {kind} is now right under vmap of grad of grad: drop the workaround"


def test_canary_pytorch_batch_norm_third_derivative_is_still_wrong_without_vmap():
    """metagrad's layers run PyTorch's training-mode kernel where no vmap is active: exact to second order, all
    that its algorithms differentiate. The third derivative (a float64 gradgradcheck of the gradient) is wrong in
    PyTorch 2.13, where the composite form's is right. Fails the day PyTorch fixes it (then say so in
    models/norm.py's docstring)."""
    g = torch.Generator().manual_seed(0)
    x = (1.5 + torch.randn(3, 2, 3, 4, generator=g, dtype=F64)).requires_grad_(True)
    c = torch.randn(3, 2, 3, 4, generator=g, dtype=F64)

    def composite(x):
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + 1e-5)

    def gradient(layer):
        return lambda x: torch.autograd.grad((layer(x) * c).sum(), x, create_graph=True)[0]

    fused = gradient(lambda x: F.batch_norm(x, None, None, training=True))
    assert torch.autograd.gradgradcheck(gradient(composite), (x,))
    assert not torch.autograd.gradgradcheck(fused, (x,), raise_exception=False), (
        "PyTorch's F.batch_norm now has a right third derivative"
    )


@pytest.mark.parametrize("kind", list(PYTORCH_LAYERS))
def test_exact_layers_are_right_under_vmap_of_grad_of_grad(kind):
    f_vmap, a = _second_order(_exact_layer(kind), True)
    f_loop, _ = _second_order(_exact_layer(kind), False)
    gv, gl = grad(f_vmap)(a), grad(f_loop)(a)
    h = 1e-6
    fd = torch.stack([(f_loop(a + h * e) - f_loop(a - h * e)) / (2 * h) for e in torch.eye(len(a), dtype=F64)])
    scale = gl.abs().max().clamp_min(1.0)
    torch.testing.assert_close(gv, gl, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(gl, fd, rtol=0, atol=1e-6 * scale)


# ----- the exact layers are PyTorch's layers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.BatchNorm1d(3), (5, 3)),
        (lambda: nn.BatchNorm1d(3, momentum=None), (5, 3, 4)),
        (lambda: nn.BatchNorm2d(3), (5, 3, 4, 4)),
        (lambda: nn.BatchNorm2d(3, affine=False), (5, 3, 4, 4)),
        (lambda: nn.BatchNorm2d(3, track_running_stats=False), (5, 3, 4, 4)),
        (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 3)),
        (lambda: nn.InstanceNorm1d(3, affine=True), (2, 3, 6)),
        (lambda: nn.InstanceNorm2d(3, affine=True), (3, 4, 4)),  # unbatched
        (lambda: nn.InstanceNorm3d(3), (2, 3, 2, 3, 3)),
        (lambda: nn.LayerNorm(4), (5, 3, 4)),
        (lambda: nn.LayerNorm((3, 4), bias=False), (5, 3, 4)),
        (lambda: nn.LayerNorm(4, elementwise_affine=False), (5, 4)),
    ],
)
def test_exact_layers_compute_what_pytorch_computes_in_train_and_eval(make, shape):
    torch.manual_seed(0)
    ref = make().double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    mine = nn.Sequential(make().double())
    mine[0].load_state_dict(ref.state_dict())
    assert norm.make_exact(mine) == ["0"]
    assert isinstance(mine[0], type(ref)) and type(mine[0]) is not type(ref)
    assert mine[0].state_dict().keys() == ref.state_dict().keys()
    for step in range(3):
        x = torch.randn(shape, dtype=F64) * 2 + step
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-10, atol=1e-10)
        for k, v in ref.state_dict().items():  # running statistics and batch counts follow PyTorch's
            torch.testing.assert_close(mine[0].state_dict()[k], v, rtol=1e-12, atol=1e-12)
    ref.eval(), mine.eval()
    x = torch.randn(shape, dtype=F64)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-10, atol=1e-10)


def test_statistics_context_overrides_the_training_flag_and_never_tracks_by_default():
    bn = norm.BatchNorm2d(2).double()
    x = torch.randn(6, 2, 3, 3, dtype=F64) * 3 + 1
    with norm.statistics("batch"):
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(2, dtype=F64)) and int(bn.num_batches_tracked) == 0
    with norm.statistics("batch", track=True):
        bn(x)
    assert int(bn.num_batches_tracked) == 1 and (bn.running_mean != 0).all()
    with norm.statistics("running"):  # training mode, yet the running statistics: each image on its own
        torch.testing.assert_close(torch.cat([bn(x[i : i + 1]) for i in range(6)]), bn(x))
    with pytest.raises(ValueError, match="statistics"):
        with norm.statistics("runing"):
            pass


def test_make_exact_refuses_and_warns_where_it_cannot_help():
    with pytest.raises(ValueError, match="track_running_stats"):
        norm.make_exact(nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True)))

    class Mine(nn.BatchNorm2d):  # a user's subclass that still runs PyTorch's kernel
        pass

    with pytest.warns(UserWarning, match="subclass metagrad.models.norm"):
        assert norm.make_exact(nn.Sequential(Mine(3))) == []

    class Own(nn.BatchNorm2d):  # the user's own forward: left alone, silently
        def forward(self, x):
            return x

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert norm.make_exact(nn.Sequential(Own(3))) == []


# ----- meta-gradients through every model and batch-norm mode ---------------------------------------------------


def _image_batch(tasks: int = 3, ways: int = 2, shots: int = 2, queries: int = 2, side: int = 8) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, ways * shots, 1, side, side, generator=g, dtype=F64)
    qx = torch.rand(tasks, ways * queries, 1, side, side, generator=g, dtype=F64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone()
    return TaskBatch(sx, sy, qx, qy)


def _vector_batch(tasks: int = 3, ways: int = 2, shots: int = 3, queries: int = 2) -> TaskBatch:
    b = _image_batch(tasks, ways, shots, queries, side=2)
    return TaskBatch(b.support_x.flatten(2), b.support_y, b.query_x.flatten(2), b.query_y)


def _user_cnn() -> nn.Module:
    """A researcher's own CNN: stock BatchNorm2d with running statistics, and an InstanceNorm (smooth
    activations and pooling, so that the finite difference has no kink to cross)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(12, 2),
    )  # fmt: skip


def _user_mlp() -> nn.Module:
    """A researcher's own MLP: LayerNorm and BatchNorm1d (running statistics)."""
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(),
                         nn.Linear(5, 2))  # fmt: skip


def _user_cnn_groupnorm() -> nn.Module:
    """A researcher's CNN with PyTorch's own GroupNorm (which metagrad leaves as it is: exact under vmap)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


def _per_step_conv4(downsample: str = "pool", side: int = 16) -> nn.Module:
    model = Conv4(ways=2, hidden=3, image_size=side, bn="per_step", steps=2, downsample=downsample)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PerStepBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _conv4_products(patches: str = "blocks", downsample: str = "pool", side: int = 16) -> nn.Module:
    """Conv-4 with every convolution a matrix product over 3x3 patches (Conv3x3.products: under vmap one batched
    product over the tasks, the default on a GPU), the patches gathered as ``Conv3x3.patches`` says."""
    model = Conv4(ways=2, hidden=3, image_size=side, downsample=downsample)
    for conv in model.convs:
        conv.products, conv.patches = True, patches
    return model


MODELS = {
    "conv4_transductive": (lambda: Conv4(ways=2, hidden=3, image_size=16), lambda: _image_batch(tasks=2, side=16)),
    "conv4_products": (_conv4_products, lambda: _image_batch(tasks=2, side=16)),
    "conv4_products_shifts": (lambda: _conv4_products("shifts"), lambda: _image_batch(tasks=2, side=16)),
    # The MAML code's Omniglot network: stride-2 convolutions, no pooling, a mean before the head. At 28x28, as
    # Omniglot: the last map is 2x2 (at 16x16 it is 1x1, and its batch norm over a few images curves the
    # meta-loss so much that a central difference's truncation error at h = 1e-6 is 3e-6).
    "conv4_stride": (lambda: Conv4(ways=2, hidden=3, image_size=28, downsample="stride"),
                     lambda: _image_batch(tasks=2, side=28)),  # fmt: skip
    "conv4_stride_products": (lambda: _conv4_products(downsample="stride", side=28),
                              lambda: _image_batch(tasks=2, side=28)),  # fmt: skip
    "conv4_per_step": (_per_step_conv4, lambda: _image_batch(tasks=2, side=16)),
    "conv4_stride_per_step": (lambda: _per_step_conv4("stride", 28), lambda: _image_batch(tasks=2, side=28)),
    "user_cnn_batchnorm_instancenorm": (_user_cnn, _image_batch),
    # The same network in channels-last memory (its activations follow the weights'): on the CPU its batch norms
    # take the precise-statistics path (models/norm.py, _PreciseBatchNorm) where no vmap is active.
    "user_cnn_channels_last": (lambda: _user_cnn().to(memory_format=torch.channels_last), _image_batch),
    "user_mlp_layernorm_batchnorm1d": (_user_mlp, _vector_batch),
    "user_cnn_groupnorm": (_user_cnn_groupnorm, _image_batch),
}
ALGORITHMS = {
    "maml": lambda m: MAML(m, inner_lr=0.5, inner_steps=2, loss="cross_entropy"),
    "maml_enhanced": lambda m: MAMLEnhanced(m, inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
    # ANIL: the body's meta-gradient comes through the head's inner gradient only (mixed second derivatives).
    "anil": lambda m: MAML(m, inner_lr=0.5, inner_steps=2, loss="cross_entropy", adapt_only=MAML.last_layer(m)),
    # The other inner rules on every norm model: learned per-parameter rates, the curvature without learned rates.
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
    "curvature_sgd": lambda m: MAML(m, Chain(Curvature(), SGD(0.3)), inner_steps=2, loss="cross_entropy"),
    # Learned per-step rates alone, per layer and stored raw (MAML Enhanced's are per tensor, as log-rates).
    "lslr_raw_per_layer": lambda m: MAML(m, LSLR(0.3, steps=2, per_layer=True, parameterization="raw"),
                                         inner_steps=2, loss="cross_entropy"),  # fmt: skip
    # A stateful rule. At Adam's usual eps = 1e-8 its normalisation of near-zero inner gradients curves the user
    # MLP's meta-loss so that a central difference's truncation error is 4e-5 at h = 1e-6 (at 1e-3, 1.6e-6 on
    # Conv-4). eps = 1e-2 smooths the smallest gradients' normalisation, with the same derivative formulas, so
    # that a central difference resolves 1e-6 on every model.
    "adam": lambda m: MAML(m, Adam(0.05, beta1=0.5, eps=1e-2), inner_steps=2, loss="cross_entropy"),
}


def _learner(model_name: str, algorithm: str, vectorize: bool):
    torch.manual_seed(0)
    make_model, make_batch = MODELS[model_name]
    learner = ALGORITHMS[algorithm](make_model())
    learner.vectorize = vectorize
    learner.to("cpu", F64)
    g = torch.Generator().manual_seed(1)
    for k, v in learner.meta_state.items():  # away from the identity / initial rates, so every factor matters
        learner.meta_state[k] = v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64)
    return learner, make_batch()


# A convolution's implementation is independent of the inner rule: the product form with MAML and MAML Enhanced.
OTHER_FORMS = {"conv4_products": ("maml", "maml_enhanced"), "conv4_products_shifts": ("maml",),
               "conv4_stride": ("maml", "maml_enhanced"), "conv4_stride_products": ("maml",),
               "conv4_stride_per_step": ("maml",)}  # fmt: skip


def _grid(algorithms) -> list[tuple[str, str]]:
    return [(m, a) for m in MODELS for a in algorithms if a in OTHER_FORMS.get(m, algorithms)]


@pytest.mark.parametrize(("model_name", "algorithm"), _grid(list(ALGORITHMS)))
def test_second_order_meta_gradient_vmap_equals_loop_equals_finite_difference(model_name, algorithm, monkeypatch):
    """The regression test for PyTorch's norm kernels under vmap: every model and BN mode, exact to 1e-6."""
    vec, batch = _learner(model_name, algorithm, True)
    loop, _ = _learner(model_name, algorithm, False)
    gp_v, gm_v, m_v = vec.meta_gradient(batch, 0)
    precise, apply = [], norm._PreciseBatchNorm.apply
    monkeypatch.setattr(norm._PreciseBatchNorm, "apply", lambda *a: precise.append(1) or apply(*a))
    gp_l, gm_l, m_l = loop.meta_gradient(batch, 0)
    if model_name in ("conv4_transductive", "conv4_stride", "user_cnn_channels_last"):  # channels-last query BNs
        assert precise, "the precise-statistics path was not taken"
    grads_v = {**gp_v, **gm_v}
    # Every entry, relative to the largest one (the defect moved entries by up to 0.9 %).
    scale = assert_vmap_equals_loop(grads_v, {**gp_l, **gm_l})
    torch.testing.assert_close(m_v["loss"], m_l["loss"], rtol=1e-12, atol=0)
    if model_name in ("conv4_transductive", "conv4_stride"):  # batch norm cancels the conv biases: exactly 0
        assert all(grads_v[f"convs.{i}.bias"].abs().max() < 1e-12 * scale for i in range(4))
    # Every tensor on its own (a wrong derivative in one batch norm's learned rate hid beside the large gradients
    # along one direction through all of them). Conv-4's ReLU and max-pooling make the inner gradient piecewise:
    # unit directions and a step small enough not to cross a kink.
    assert_every_tensor_matches_central_differences(loop, batch, gp_v, gm_v)


FIRST_ORDER = ("maml", "maml_enhanced", "metasgd", "anil", "curvature_sgd", "lslr_raw_per_layer", "adam")


@pytest.mark.parametrize(("model_name", "algorithm"), _grid(FIRST_ORDER))
def test_first_order_meta_gradient_vmap_equals_loop_equals_frozen_inner_gradients(model_name, algorithm):
    """First order on every norm model: vmap == loop, and both equal, tensor by tensor, central differences of the
    meta-loss with the inner gradients frozen (the learned rates and curvature still differentiated)."""
    vec, batch = _learner(model_name, algorithm, True)
    loop, _ = _learner(model_name, algorithm, False)
    for learner in (vec, loop):
        learner.first_order = True
    gp_v, gm_v, _ = vec.meta_gradient(batch, 0)
    gp_l, gm_l, _ = loop.meta_gradient(batch, 0)
    assert_vmap_equals_loop({**gp_v, **gm_v}, {**gp_l, **gm_l})
    assert_first_order_matches_frozen_inner_gradients(loop, batch, gp_v, gm_v)


# (The first-order check replays the frozen inner gradients one task at a time: the loop only.)
DROPOUT_PATHS = {"vmap_second_order": (True, False), "loop_second_order": (False, False),
                 "loop_first_order": (False, True)}  # fmt: skip


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.parametrize(("vectorize", "first_order"), DROPOUT_PATHS.values(), ids=list(DROPOUT_PATHS))
def test_dropout_in_training_meta_gradient_equals_central_differences_with_the_same_masks(
    vectorize, first_order, algorithm
):
    """A user's CNN with dropout on (training mode) and batch norm, MAML and Meta-SGD: with the step's randomness
    seeded, the meta-gradient equals every tensor's central difference taken with the same masks (first order:
    with the inner gradients frozen). vmap and the loop draw different masks, so each path is checked on its own."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.SiLU(), nn.Dropout(0.3), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(48, 2),
    )  # fmt: skip
    make = {"maml": MAML, "metasgd": MetaSGD}[algorithm]
    learner = make(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy", vectorize=vectorize,
                   first_order=first_order).to("cpu", F64)  # fmt: skip
    assert learner.random and learner.training
    batch = _image_batch()
    gp, gm, _ = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(7))

    def same_masks():
        return learner._task_randomness(torch.Generator().manual_seed(7), torch.device("cpu"))

    if first_order:
        assert_first_order_matches_frozen_inner_gradients(learner, batch, gp, gm, randomness=same_masks)
    else:
        assert_every_tensor_matches_central_differences(learner, batch, gp, gm, randomness=same_masks)
    # The masks matter: other masks give another gradient.
    other = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(8))[0]
    assert not torch.allclose(other["0.weight"], gp["0.weight"], rtol=1e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("model_name", ["conv4_transductive", "conv4_per_step", "user_cnn_batchnorm_instancenorm"])
def test_reptile_on_norm_models_vmap_equals_loop_in_float64(model_name, optimizer):
    """Reptile's weight move through batch norm, vmapped and in the task loop, in float64, twice (the second call
    uses the persisted inner Adam state). Relative to the largest entry: the conv biases that batch norm cancels
    move only by rounding, which Adam's normalisation scales up."""
    kw = {"inner_lr": 0.02, "inner_steps": 2, "inner_batch": 3, "inner_optimizer": optimizer}
    learners = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        make_model, make_batch = MODELS[model_name]
        learners.append(Reptile(make_model(), vectorize=vectorize, loss="cross_entropy", **kw).to("cpu", F64))
    vec, loop = learners
    batch = make_batch()
    for it in range(2):
        d_v, _, m_v = vec.meta_gradient(batch, it, torch.Generator().manual_seed(100 + it))
        d_l, _, m_l = loop.meta_gradient(batch, it, torch.Generator().manual_seed(100 + it))
        assert assert_vmap_equals_loop(d_v, d_l, rel=1e-7) > 0  # (and the weights moved)
        torch.testing.assert_close(m_v["loss"], m_l["loss"], rtol=1e-10, atol=0)
