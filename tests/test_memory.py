"""XLA:CPU buffer-structure tests: no gradient-sized temporary in the train step.

These read the temporary allocation of a compiled (never run) program on the
CPU backend, so they are skipped on other backends. They check structure, not
exact sizes: "no gradient-sized temporary" means under an eighth of one
gradient leaf (today's programs need a few hundred bytes of scalars; the
smallest gradient-sized buffer is a whole leaf), and "one gradient copy" means
under 1.5 gradient trees (a second copy, or a copy of Adam's moments, is 2 or
more), so an XLA upgrade that moves a few scalars or a layout does not fail them.

Clipping multiplies by one scalar factor, so XLA fuses the scale into Adam's
moment updates and needs no extra buffer; optax's own ``clip_by_global_norm``
(``select(norm < c, g, g / norm * c)``) materialises a full copy of the clipped
gradients, which serves as the control that the measurement sees such a
buffer. We compile the full step ``(params, opt_state, grads) -> (new_params,
new_opt_state)`` with params and opt_state donated.

The outputs must come back in the order of the donated inputs: JAX aliases
donated inputs to outputs of matching shape in order, so returning
``(opt_state, params)`` for inputs ``(params, opt_state)`` makes XLA insert
copies of everything and hides the difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_guard as og

N_LEAVES = 4
LEAF_SHAPE = (1024, 1024)  # 4 x 1M float32 parameters: 16 MiB of gradients
LEAF_BYTES = 1024 * 1024 * 4
GRAD_BYTES = N_LEAVES * LEAF_BYTES
NO_GRADIENT_SIZED = LEAF_BYTES // 8  # "no gradient-sized temporary": far under one leaf

pytestmark = pytest.mark.xla_cpu  # skipped on other backends (see conftest.py)


def _temp_bytes(clip: optax.GradientTransformation, *, whole: bool = False) -> int:
  """Temporary bytes of the step with ``chain(clip, adam)`` (or ``clip`` alone)."""
  tx = clip if whole else optax.chain(clip, optax.adam(1e-3))
  params = {
      f"w{i}": jax.ShapeDtypeStruct(LEAF_SHAPE, jnp.float32) for i in range(N_LEAVES)
  }
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, params).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend gives no memory analysis")
  return int(analysis.temp_size_in_bytes)


def test_clip_by_global_norm_step_has_no_gradient_sized_temporary():
  baseline = _temp_bytes(optax.identity())
  ours = _temp_bytes(og.clip_by_global_norm(1.0))
  theirs = _temp_bytes(optax.clip_by_global_norm(1.0))
  print(f"temp bytes: identity {baseline}, optax_guard {ours}, optax {theirs} "
        f"(gradients {GRAD_BYTES}, largest leaf {LEAF_BYTES})")
  # the harness itself (plain Adam with donation) needs no big temporary
  assert baseline < NO_GRADIENT_SIZED
  # ours: only scalars (the partial norms and the factor)
  assert ours < NO_GRADIENT_SIZED
  # control: optax's clip in the same chain materialises the clipped gradients
  if theirs < LEAF_BYTES:
    pytest.skip("control lost: XLA now fuses optax.clip_by_global_norm too")


@pytest.mark.parametrize("name", ["monitor", "zclip", "autoclip", "clip_by_norm"])
def test_statistics_before_adam_need_no_gradient_sized_temporary(name):
  """A norm taken before Adam must not share ``g * g`` with Adam's second
  moment (XLA's CSE would then materialise the product as a temporary)."""
  tx = {
      "monitor": og.monitor(),
      "zclip": og.zclip(),
      "autoclip": og.autoclip(history_size=16),
      "clip_by_norm": og.clip_by_norm(1.0),
  }[name]
  assert _temp_bytes(tx) < NO_GRADIENT_SIZED


def test_skip_nonfinite_step_temporary_is_at_most_one_gradient_copy():
  """The guard's ``lax.cond`` outputs the updates as a buffer (XLA cannot
  fuse across a conditional) but must not copy the optimizer state."""
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))
  ours = _temp_bytes(og.skip_nonfinite(inner), whole=True)
  assert ours < 1.5 * GRAD_BYTES


@pytest.mark.parametrize("name", ["spam", "stable_adamw", "adagc"])
def test_large_scale_optimizers_need_no_gradient_sized_temporary(name):
  """The optimizers that read their own moments update them in place like
  ``optax.adamw``: SPAM's first moment reads the previous second moment, which a
  careless formulation makes XLA copy whole before overwriting it."""
  tx = {
      "spam": og.spam(1e-3, weight_decay=0.1),
      "stable_adamw": og.stable_adamw(1e-3, weight_decay=0.1),
      "adagc": optax.chain(og.adagc(), optax.adamw(1e-3, weight_decay=0.1)),
  }[name]
  assert _temp_bytes(optax.adamw(1e-3, weight_decay=0.1), whole=True) < NO_GRADIENT_SIZED
  assert _temp_bytes(tx, whole=True) < NO_GRADIENT_SIZED


_ONE_DEVICE_SPAM = """
import jax, jax.numpy as jnp, numpy as np, optax, optax_guard as og
from optax_guard import _numerics as num
assert jax.device_count() == 1
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32),
          "b": jnp.zeros(64), "s": jnp.ones(()), "e": jnp.zeros((0, 3))}
grads = []
for k in range(7):
  g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 1e-2, p.dtype), params)
  if k == 4:  # spikes, and a non-finite first element
    g["w"] = g["w"].at[0, 0].set(jnp.inf).at[3].multiply(1e4)
  grads.append(g)

def step_of(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=(0, 1))

def cost(tx):
  c = step_of(tx).lower(params, tx.init(params), params).compile()
  ca = c.cost_analysis()
  ca = ca[0] if isinstance(ca, list) else ca
  return ca["bytes accessed"], c.memory_analysis().temp_size_in_bytes

def run():
  tx = og.spam(1e-2, weight_decay=0.1, threshold=4.0, reset_interval=5, warmup_steps=2,
               clip_delay=1)
  step, p = step_of(tx), jax.tree.map(jnp.copy, params)
  s = tx.init(p)
  for g in grads:
    p, s = step(p, s, g)
  out = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves((p, s)))
  adamw = cost(optax.adamw(1e-2, eps=1e-6, weight_decay=0.1))
  spam = cost(tx)
  return out, spam[0] / adamw[0], spam[1]

one, one_ratio, one_temp = run()
num._single_device = lambda: False  # as with several devices: the whole first moment
every, every_ratio, every_temp = run()
print(one == every, round(one_ratio, 3), round(every_ratio, 3), one_temp, every_temp)
"""


def test_spam_orders_its_moments_through_one_element_on_one_device():
  """On a single device (a fresh process) SPAM's second-moment loop reads one element
  of the new first moment, not all of it: XLA's bytes accessed are adamw's plus one
  read of the old second moment (1.1x), against 1.2x when every element orders its
  own (what several devices compile, where the moment may be sharded). Both write the
  second moment in place (no temporary) and give the same bits, through spikes, a
  non-finite gradient and a moment reset."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _ONE_DEVICE_SPAM], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  same, one_ratio, every_ratio, one_temp, every_temp = out
  assert same == "True"
  assert float(one_ratio) < 1.15 < float(every_ratio) < 1.25, (one_ratio, every_ratio)
  assert int(one_temp) < NO_GRADIENT_SIZED and int(every_temp) < NO_GRADIENT_SIZED
