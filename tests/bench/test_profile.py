"""bench/profile.py: where the time goes, by the op's origin in XLA:CPU's and torch's traces."""

import jax
import jax.numpy as jnp

from ttrl_jax.bench import profile


def test_xla_breakdown_puts_each_op_where_it_comes_from():
    def loss(w_DD, e_VD, x_BD):
        h_BD = jnp.tanh(x_BD @ w_DD)
        with jax.named_scope("unembed"):
            logits_BV = h_BD @ e_VD.T
        return jax.nn.logsumexp(logits_BV, axis=-1).sum()

    def step(w_DD, e_VD, x_BD):
        g = jax.grad(loss)(w_DD, e_VD, x_BD)
        with jax.named_scope("optimizer"):
            return w_DD - 0.1 * g

    args = [jnp.ones((256, 256)), jnp.ones((512, 256)), jnp.ones((64, 256))]
    compiled = jax.jit(step).lower(*args).compile()
    out = profile.xla_breakdown(lambda: compiled(*args).block_until_ready(), compiled.as_text())
    for category in (
        "forward: dense matmuls",
        "backward: dense matmuls",
        profile.UNEMBED,
        profile.OPTIMIZER,
    ):
        assert out.seconds.get(category, 0) > 0, (category, out.seconds)
    assert out.total > 0 and out.wall > 0


def test_torch_breakdown_follows_backward_ops_to_their_forward_labels():
    import torch

    w = torch.ones(256, 256, requires_grad=True)
    e = torch.ones(512, 256, requires_grad=True)
    x = torch.ones(64, 256)

    def step():
        h = torch.tanh(x @ w)
        with torch.profiler.record_function("unembed"):
            loss = torch.logsumexp(h @ e.T, dim=-1).sum()
        loss.backward()

    out = profile.torch_breakdown(step)
    assert out.seconds.get("forward: dense matmuls", 0) > 0
    assert out.seconds.get("backward: dense matmuls", 0) > 0
    # The unembedding's backward matmul is counted with it, not with the decoder's.
    assert out.seconds.get(profile.UNEMBED, 0) > out.seconds["backward: dense matmuls"] / 4
