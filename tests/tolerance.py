"""Float32 comparisons between two programs that compute the same thing.

Two programs (remat or not, sharded or not, packed or not, JAX or torch or a
float64 reference) round differently: XLA fuses, splits and reorders
reductions as the program and the CPU allow, and a sum of n terms moves by
up to about n * eps * sum |terms|. An output element that is a small
difference of large terms (a gradient near zero, a reward margin) carries the
rounding of those terms, not its own. So a tolerance here is counted in
float32 eps of the SCALE of the compared values (max |want| over the array,
or the terms a value is made of), never as an absolute 1e-7: that is one eps
of values near 1 and less than one for anything larger.

ULPS = 256 eps of the scale (3.1e-5 relative). Measured on this suite, the
largest disagreement is 22 eps of the scale (Video-LLaVA logits against
transformers) and 16 for gradients and metrics (remat, packing, sharding,
torch), so ULPS leaves a margin of 10x or more for other CPUs and XLA
versions, while a real bug (a leaked mask, a dropped microbatch, a wrong
formula) moves values by percents.
"""
import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)
ULPS = 256
# Share of the learning rate by which two programs' weights may part per
# AdamW step (see assert_adam_weights_close).
ADAM_STEP_SHARE = 0.05


def assert_close(got, want, *, scale=None, ulps=ULPS, err_msg=""):
  """|got - want| <= ulps * EPS * scale elementwise; scale: max |want|."""
  want = np.asarray(want, np.float64)
  if scale is None:
    scale = _scale(want)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=ulps * EPS * scale, err_msg=err_msg)


def _scale(x) -> float:
  return float(np.abs(np.asarray(x, np.float64)).max(initial=0.0))


def assert_trees_close(got, want, *, ulps=ULPS):
  """assert_close leaf by leaf (each parameter on its own scale)."""
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want), strict=True):
    assert_close(g, w, ulps=ulps, err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(got: dict, want: dict, *, ulps=ULPS):
  """Training metrics, each named in `want`, on its scale.

  Losses and rewards are sums and differences of the summed log-probs, so
  they are rounded on the log-probs' scale (a reward margin near 0 is a
  difference of log-probs near -30); other metrics (grad_norm, tokens) on
  their own.
  """
  logps = [_scale(want[k]) for k in ("logps/chosen", "logps/rejected")
           if k in want]
  for name, value in want.items():
    made_of_logps = name.startswith(("loss", "rewards/", "logps/"))
    scale = max([_scale(value)] + (logps if made_of_logps else []))
    assert_close(got[name], value, scale=scale, ulps=ulps, err_msg=name)


def assert_adam_weights_close(got, want, *, learning_rate, steps=1):
  """Weights of two programs after `steps` AdamW steps from the same start.

  Adam moves a weight by lr * m / (sqrt(v) + eps_adam), about lr * sign(g)
  whatever |g|. Where |g| is within a few eps_adam (1e-8) of zero the step's
  slope in g is up to lr / (4 eps_adam), so float32 rounding of g moves that
  weight by a share of lr that no count of ulps bounds. Elsewhere the two
  agree to rounding. So the tolerance is a share of lr per step.
  """
  atol = ADAM_STEP_SHARE * learning_rate * steps
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
