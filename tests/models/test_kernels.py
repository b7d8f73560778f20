"""t5x_lite.kernels: the CPU matmul (gradient products on XLA:CPU's fast dot kernel in fp32,
its native bf16 dot in bf16), the argmax, and the whole model on the CPU kernels equal to
the plain path that TPU/GPU run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import cpu_features, kernels, models

ON_CPU = jax.devices()[0].platform == 'cpu'


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _f64(a):
  return np.asarray(a.astype(jnp.float32), np.float64)


def _assert_bf16_close(got, want):
  """Equal up to bf16 rounding of the result (8 significant bits) and f32 accumulation."""
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(_f64(got), want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def _loss(matmul, cotangent):
  return lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize('m,k,n', [(64, 48, 40), (5, 3, 7), (1, 16, 9)])
def test_value_and_gradients_are_the_exact_products_rounded_to_bf16(m, k, n):
  rng = np.random.default_rng(m)
  x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n), 0.2)
  g = _bf16(rng, (m, n))  # bf16, so the cotangent reaching the matmul is exactly g
  dx, dw = jax.jit(jax.grad(_loss(kernels.CPU.matmul, g.astype(jnp.float32)),
                            argnums=(0, 1)))(x, w)
  _assert_bf16_close(jax.jit(kernels.CPU.matmul)(x, w), _f64(x) @ _f64(w))
  _assert_bf16_close(dx, _f64(g) @ _f64(w).T)
  _assert_bf16_close(dw, _f64(x).T @ _f64(g))


def test_gradients_equal_autodiff_of_the_plain_bf16_matmul():
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, (32, 24)), _bf16(rng, (24, 16), 0.2)
  c = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
  ours = jax.jit(jax.grad(_loss(kernels.CPU.matmul, c), argnums=(0, 1)))(x, w)
  plain = jax.jit(jax.grad(_loss(jnp.matmul, c), argnums=(0, 1)))(x, w)
  for a, b in zip(ours, plain):
    _assert_bf16_close(a, _f64(b))


def _dot_operand_types(hlo_text):
  """(lhs, rhs, out) element types of every dot in an optimized HLO module."""
  found = []
  for computation in re.split(r'\n(?=\S)', hlo_text):
    types = dict(re.findall(r'(?:^|\s|\()%?([\w.\-]+)(?: = |: )(\w+)\[', computation))
    for out, lhs, rhs in re.findall(r'= (\w+)\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)',
                                    computation):
      found.append((types.get(lhs), types.get(rhs), out))
  return found


@pytest.mark.skipif(not (ON_CPU and cpu_features.has_native_bf16()),
                    reason='the native bf16 dot path exists on CPUs with AVX512-BF16 or AMX')
def test_forward_and_both_gradient_products_run_as_native_bf16_dots():
  rng = np.random.default_rng(2)
  x, w = _bf16(rng, (256, 128)), _bf16(rng, (128, 192))
  c = jnp.ones((256, 192), jnp.float32)
  step = jax.jit(jax.value_and_grad(_loss(kernels.CPU.matmul, c), argnums=(0, 1)))
  dots = _dot_operand_types(step.lower(x, w).compile().as_text())
  assert len(dots) == 3 and set(dots) == {('bf16', 'bf16', 'f32')}, dots


def test_runs_where_xla_has_no_native_bf16_dot():
  """With XLA:CPU's YNNPACK dots off, XLA converts the operands to f32 itself: same values."""
  rng = np.random.default_rng(3)
  x, w = _bf16(rng, (48, 32)), _bf16(rng, (32, 40), 0.2)
  c = jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)
  grad = jax.grad(_loss(kernels.CPU.matmul, c), argnums=(0, 1))
  options = {'xla_cpu_experimental_ynn_fusion_type': ''} if ON_CPU else {}
  without = jax.jit(grad, compiler_options=options)(x, w)
  for a, b in zip(without, jax.jit(grad)(x, w)):
    _assert_bf16_close(a, _f64(b))


def _f32(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize('m,k,n', [(96, 64, 40), (5, 3, 7), (1, 16, 9)])
def test_f32_value_and_gradients_equal_the_plain_matmul(m, k, n):
  rng = np.random.default_rng(m)
  x, w, c = _f32(rng, (m, k)), _f32(rng, (k, n), 0.2), _f32(rng, (m, n))
  ours = jax.jit(jax.value_and_grad(_loss(kernels.CPU.matmul, c), argnums=(0, 1)))(x, w)
  plain = jax.jit(jax.value_and_grad(_loss(jnp.matmul, c), argnums=(0, 1)))(x, w)
  np.testing.assert_array_equal(jax.jit(kernels.CPU.matmul)(x, w), jax.jit(jnp.matmul)(x, w))
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(ours[1][1], _f64(x).T @ _f64(c), rtol=1e-5, atol=1e-5)


def _dots_reading_lhs_transposed(hlo_text):
  return re.findall(r' dot\([^\n]*lhs_contracting_dims=\{0\}', hlo_text)


@pytest.mark.skipif(not ON_CPU, reason='the CPU path only')
def test_f32_weight_gradient_reads_no_operand_transposed():
  """The plain matmul's weight gradient reads x transposed (so XLA:CPU runs it on Eigen);
  ours reads a materialised x^T, a dot YNNPACK takes."""
  rng = np.random.default_rng(4)
  x, w, c = _f32(rng, (256, 128)), _f32(rng, (128, 192)), _f32(rng, (256, 192))

  def hlo(matmul):
    return jax.jit(jax.grad(_loss(matmul, c), argnums=(0, 1))).lower(x, w).compile().as_text()

  assert _dots_reading_lhs_transposed(hlo(jnp.matmul))  # the test can see the difference
  assert not _dots_reading_lhs_transposed(hlo(kernels.CPU.matmul))


def test_other_dtypes_and_the_plain_kernels_take_the_plain_matmul():
  x16, x32 = jnp.ones((4, 4), jnp.bfloat16), jnp.ones((4, 4), jnp.float32)
  assert 'custom_vjp_call' not in str(jax.make_jaxpr(kernels.CPU.matmul)(x16, x32))
  assert 'custom_vjp_call' in str(jax.make_jaxpr(kernels.CPU.matmul)(x32, x32))
  bf16 = jax.make_jaxpr(kernels.CPU.matmul)(x16, x16)
  assert ('custom_vjp_call' in str(bf16)) == cpu_features.has_native_bf16()
  for x in (x16, x32):
    assert 'custom_vjp_call' not in str(jax.make_jaxpr(kernels.PLAIN.matmul)(x, x))


def test_kernels_are_chosen_from_the_platform():
  assert kernels.for_platform('cpu') is kernels.CPU
  assert kernels.for_platform('tpu') is kernels.PLAIN
  assert kernels.for_platform('gpu') is kernels.GPU
  assert kernels.GPU.platform == 'plain' and kernels.GPU.attention == 'cudnn'
  assert kernels.CPU.attention == kernels.PLAIN.attention == 'plain'
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1])
  assert kernels.for_mesh(mesh) == kernels.for_platform(jax.devices()[0].platform)
  assert models.build(models.preset('flan_t5', 'tiny')).ops == kernels.default()
  with pytest.raises(ValueError, match="unknown kernels 'tpu'"):
    kernels.Kernels('tpu')
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    kernels.Kernels('plain', attention='flash')


@pytest.mark.parametrize('ops', [kernels.CPU, kernels.PLAIN])
def test_argmax_is_the_first_index_of_the_maximum(ops):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 50)).astype(np.float32)
  logits[1, [3, 7, 40]] = 9.0       # a tie: the first index wins
  logits[2] = 0.0                   # all equal
  logits[3, -1] = np.inf
  logits[4, 5] = -np.inf
  got = jax.jit(ops.argmax)(jnp.asarray(logits))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))


def test_model_on_cpu_kernels_equals_the_plain_path():
  """What TPU/GPU users run (plain x @ w, no barriers) gives the same logits and gradients
  as the XLA:CPU kernels, on CPU, fp32, dropout off."""
  config = models.preset('flan_t5', 'tiny', d_model=128, d_kv=32, d_ff=256)
  params = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(3, config.vocab_size, (4, 24)), jnp.int32).at[:, -5:].set(0)
  dec = jnp.asarray(rng.integers(3, config.vocab_size, (4, 12)), jnp.int32).at[:, -3:].set(0)

  def value_and_grad(ops):
    model = models.Transformer(config, ops)
    loss = lambda p: jnp.mean(model.apply({'params': p}, enc, dec) ** 2)
    logits = jax.jit(model.apply)({'params': params}, enc, dec)
    return logits, jax.jit(jax.grad(loss))(params)

  logits_cpu, grads_cpu = value_and_grad(kernels.CPU)
  logits_plain, grads_plain = value_and_grad(kernels.PLAIN)
  np.testing.assert_allclose(logits_cpu, logits_plain, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


# --- attention through jax.nn.dot_product_attention ----------------------------------------

XLA_ATTENTION = kernels.Kernels('cpu' if ON_CPU else 'plain', attention='xla')


def _packed_t5_batch(rng, vocab_size, rows=4, inputs=24, targets=12):
  """Two segments per row, then padding: T5's relative position bias plus segment and
  padding masks in every attention (encoder, decoder causal, cross)."""
  batch = {}
  for prefix, length, key in (('encoder', inputs, 'input'), ('decoder', targets, 'target')):
    cut, pad = length // 2, length - length // 5
    segments = np.zeros((rows, length), np.int32)
    segments[:, :cut], segments[:, cut:pad] = 1, 2
    positions = np.where(segments == 2, np.arange(length) - cut, np.arange(length))
    tokens = rng.integers(3, vocab_size, (rows, length)) * (segments > 0)
    batch[f'{prefix}_{key}_tokens'] = tokens
    batch[f'{prefix}_segment_ids'] = segments
    batch[f'{prefix}_positions'] = positions * (segments > 0)
  batch['decoder_input_tokens'] = np.where(batch['decoder_positions'] == 0, 0, np.roll(
      batch['decoder_target_tokens'], 1, axis=1))
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _logits_and_grads(config, ops, params, batch):
  model = models.Transformer(config, ops)
  features = dict(batch)
  features.pop('decoder_target_tokens')
  apply = lambda p: model.apply({'params': p}, **features).astype(jnp.float32)
  loss = lambda p: jnp.mean(apply(p) ** 2)
  return jax.jit(apply)(params), jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dot_product_attention_path_equals_the_plain_path(dtype, monkeypatch):
  """jax.nn.dot_product_attention (implementation='xla': the call cuDNN gets on a GPU, on
  any backend) with T5's relative position bias and packed segment + padding masks: the same
  logits and parameter gradients as the model's own attention (the CPU/TPU default)."""
  config = models.preset('flan_t5', 'tiny', d_model=64, d_kv=16, d_ff=128, dtype=dtype)
  params = models.init_params(config, jax.random.key(0))
  batch = _packed_t5_batch(np.random.default_rng(0), config.vocab_size)
  default = kernels.for_platform(jax.devices()[0].platform)
  assert default.attention == 'plain' or not ON_CPU   # the CPU default is untouched
  want_logits, want_grads = _logits_and_grads(config, kernels.Kernels(default.platform),
                                              params, batch)
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **kw: calls.append(kw) or fused(*a, **kw))
  got_logits, got_grads = _logits_and_grads(config, XLA_ATTENTION, params, batch)
  # every attention of the model (2 encoder, 2 decoder self, 2 cross layers) took the call
  assert len(calls) >= 6 and all(kw['implementation'] == 'xla' and kw['scale'] == 1.0
                                 for kw in calls)
  tol = 1e-5 if dtype == 'float32' else 3e-2   # bf16: the plain path rounds q k^T to bf16
  np.testing.assert_allclose(got_logits, want_logits, rtol=tol,
                             atol=tol * float(np.abs(want_logits).max()))
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


def _attention_inputs(rng, dtype, batch=2, q=6, s=8, heads=3, head_dim=8):
  x = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  mask = rng.random((batch, 1, q, s)) > 0.3
  mask[:, :, :, 0] = True
  bias = rng.standard_normal((batch, heads, q, s)) + np.where(mask, 0.0, -1e10)
  return (x(batch, q, heads, head_dim), x(batch, s, heads, head_dim),
          x(batch, s, heads, head_dim), jnp.asarray(bias, jnp.float32))


def _plain_attention(query, key, value, bias):
  """The model's attention (models/layers.py) on [B, T, H, K] operands."""
  scores = jnp.einsum('bqhk,bshk->bhqs', query, key).astype(jnp.float32) + bias
  probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
  return jnp.einsum('bhqs,bshk->bqhk', probs, value)


def test_fused_attention_kernel_equals_plain_attention_with_its_gradients():
  """The kernel alone (fp32): output and gradients for q, k, v and the bias (T5's relative
  position bias is learned: its gradient flows through `bias`)."""
  query, key, value, bias = _attention_inputs(np.random.default_rng(1), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(2).standard_normal(query.shape), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
  fused = lambda q, k, v, b: kernels.Kernels(attention='xla').fused_attention(q, k, v, b)
  got = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2, 3)))(query, key, value, bias)
  want = jax.jit(jax.value_and_grad(loss(_plain_attention), argnums=(0, 1, 2, 3)))(
      query, key, value, bias)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_fused_attention_declines_what_it_does_not_take():
  """None (the caller runs its plain path): plain kernels, dropout on, and for cuDNN fp32
  activations or odd lengths; the checks run before any cuDNN call, so on any backend."""
  f32 = _attention_inputs(np.random.default_rng(3), jnp.float32)
  bf16_odd = _attention_inputs(np.random.default_rng(3), jnp.bfloat16, q=5)
  assert kernels.PLAIN.fused_attention(*f32) is None
  assert kernels.CPU.fused_attention(*f32) is None
  assert kernels.Kernels(attention='xla').fused_attention(*f32, dropout=True) is None
  assert kernels.GPU.fused_attention(*f32) is None
  assert kernels.GPU.fused_attention(*bf16_odd) is None
