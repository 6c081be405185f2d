"""Small demo: a deep tanh MLP trained with and without clip_by_global_norm."""

import jax
import jax.numpy as jnp
import optax

import optax_guard as og


def main():
  key = jax.random.PRNGKey(0)
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (256, 16))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  keys = jax.random.split(kw, 12)
  params = [3.0 * jax.random.normal(k, (16, 16)) / 4.0 for k in keys[:-1]]
  params.append(jax.random.normal(keys[-1], (16, 1)))

  def loss_fn(ps):
    h = x
    for w in ps[:-1]:
      h = jnp.tanh(h @ w) * 3.0
    return jnp.mean((h @ ps[-1] - y) ** 2)

  for name, tx in [("sgd", optax.sgd(0.05)),
                   ("clip_by_global_norm(1) + sgd",
                    optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.05)))]:
    ps, state = params, tx.init(params)

    @jax.jit
    def step(ps, state, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(ps)
      u, state = tx.update(g, state, ps)
      return optax.apply_updates(ps, u), state, loss

    for _ in range(200):
      ps, state, loss = step(ps, state)
    print(f"{name:32s} final loss {float(loss_fn(ps)):.4g}")


if __name__ == "__main__":
  main()
