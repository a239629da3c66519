"""Text-side layout grounding: the caption tokens of each object are trained to state where the object is.

Under the denoising loss a relation word gives no first-order signal: over shapes-bench, "X to the left of Y"
puts a colour on the left as often as on the right, and only the relation word together with the order of the
two objects says where each goes (docs/results.md, sessions 19-23). This term asks the text encoder for that
conjunction directly. For attribute group k (`config.data.token_groups`: tokens T_k, pixel mask h_k) the mean of
the encoder's output states over T_k, read at two fixed `channels`, regresses the mask's centroid c_k = (x, y)
in [-1, 1] (x: column, y: row; -1 = left / top edge):

  L_layout = mean over valid groups k of  || mean_{j in T_k} s_j[channels] - c_k ||^2 .

No parameters are added: the encoder's last projection and norm can move any feature onto two channels, and a
U-Net's cross-attention keys and values then read the place linearly. The gradient reaches the text encoder
only, so it needs a trainable one.

Two options make the places fit a U-Net's layout splat (`layout_splat_channels`), which paints every token at its
own place. `per_token=True` regresses every token of a group on the centroid, not their mean, so no word of an
object sits on the other object's side. `object_channel=c` adds a per-token logistic term on state channel c: 1 on
the tokens of object groups (covering less than `BACKGROUND_AREA` of the image), 0 on every other token of a row
that has groups, so the splat can tell object words from function words without the groups at inference.
`spread_channel=c` trains channel c as the log std of a Gaussian footprint per token: the object's pixels are read
as samples of N(place, sigma^2 I) around the token's (stopped) place, so sigma^2 = (the mask's second moment about
its centroid + the place error^2) / 2 at the optimum. A splat of that width is object-sized where the text fixes
the place and widens where it cannot (two objects with no relation named, a single object anywhere).
`placed` (per group, from the data hook; `config.diffusion.layout.placed_only`) makes that a hard choice: only the
groups whose caption fixes their place (a relation, coordinates) are regressed and marked as objects, so a splat
gated by the object channel paints nothing where the text leaves the place open.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from t2i.models.unet import pixel_centres, squared_distances

BACKGROUND_AREA = 0.5  # groups covering more of the image than this are not objects (order metric, object channel)


def _masked_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
  """sum(x * weight) / sum(weight), 0 when the weights are all 0."""
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def centroids(masks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(centroids [B, K, 2] as (x, y) in [-1, 1], area [B, K] as a share of the image) of masks [B, K, h, w]."""
  m = masks.astype(jnp.float32)
  h, w = m.shape[-2:]
  ys, xs = pixel_centres(h), pixel_centres(w)
  mass = jnp.sum(m, axis=(-2, -1))
  safe = jnp.maximum(mass, 1e-9)
  cx = jnp.einsum("bkhw,w->bk", m, xs) / safe
  cy = jnp.einsum("bkhw,h->bk", m, ys) / safe
  return jnp.stack([cx, cy], -1), mass / (h * w)


def second_moments(masks: jax.Array, centres: jax.Array) -> jax.Array:
  """[B, K]: mean over each mask's pixels (weighted by the mask) of the squared distance to centres [B, K, 2]."""
  m = masks.astype(jnp.float32)
  d2 = squared_distances(centres, *m.shape[-2:])  # [B, K, h, w]
  return jnp.sum(m * d2, axis=(-2, -1)) / jnp.maximum(jnp.sum(m, axis=(-2, -1)), 1e-9)


def layout_loss(states: jax.Array, group_tokens: jax.Array, group_masks: jax.Array,
                row_weight: jax.Array | None = None, channels: tuple[int, int] = (0, 1), per_token: bool = False,
                object_channel: int = -1, spread_channel: int = -1,
                placed: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Layout term and metrics.

  Args:
    states: [B, L, D] text-encoder output states (the tokens group_tokens indexes).
    group_tokens: f32 [B, K, L], 1 on the tokens of group k (all zero: no group).
    group_masks: f32 [B, K, h, w] in [0, 1], each group's pixels.
    row_weight: optional [B] (0 for rows made unconditional by condition dropout).
    channels: the two state channels that hold (x, y).
    per_token: regress each token of a group on the centroid (mean over the group's tokens of the squared error)
      instead of the tokens' mean state.
    object_channel: >= 0 adds the mean binary cross-entropy of sigmoid(states[..., object_channel]) against "the
      token belongs to an object group", over all tokens of the rows with a valid group (metrics `layout_object`,
      and `layout_object_acc`, the share of those tokens on the right side of 0).
    spread_channel: >= 0 adds, per token j of group k, the Gaussian negative log-likelihood of the mask's pixels
      around the token's place (gradient stopped) with log std s_j = states[j, spread_channel]:
      (M2_k + ||c_k - sg(place_j)||^2) exp(-2 s_j) / 2 + 2 s_j, M2_k the mask's second moment about its centroid
      (metrics `layout_spread`, and `layout_sigma`, the mean exp(s_j) over object tokens).
    placed: optional [B, K], 1 where the caption fixes group k's place. Given, only placed groups count for the
      place, order and spread terms, and the object channel's target is 1 only on placed object groups (still 0 on
      every other token of a row with any group, so unplaced object words learn "not painted").
  Returns:
    (term, {"layout", "layout_order", ...}): layout_order is, over rows naming two objects (the first two groups, each
    covering less than half the image) whose centroids differ by more than 0.25 along some axis, the share whose
    predicted centroids are ordered like the true ones along the axis where they differ most. 0.5 is chance: a
    text encoder that ignores relation words cannot beat it on shapes-bench's position captions (its two-object
    captions name no relation, so they stay at chance whatever the encoder does).
  """
  sel = group_tokens.astype(jnp.float32)
  n = jnp.sum(sel, axis=-1)  # [B, K]
  valid = (n > 0).astype(jnp.float32)
  if row_weight is not None:
    valid = valid * row_weight.astype(jnp.float32)[:, None]
  has_group = (jnp.sum(valid, -1) > 0).astype(jnp.float32)  # [B]: rows the object channel counts
  if placed is not None:
    valid = valid * placed.astype(jnp.float32)
  xy = jnp.take(states.astype(jnp.float32), jnp.asarray(channels), axis=-1)  # [B, L, 2]
  pred = jnp.einsum("bkl,blc->bkc", sel, xy) / jnp.maximum(n, 1.0)[..., None]
  target, area = centroids(group_masks)
  if per_token:  # mean over the group's tokens of || s_j - c_k ||^2
    d2 = jnp.sum((xy[:, None] - target[:, :, None]) ** 2, -1)  # [B, K, L]
    err = jnp.sum(d2 * sel, -1) / jnp.maximum(n, 1.0)
  else:
    err = jnp.sum((pred - target) ** 2, -1)  # [B, K]
  term = _masked_mean(err, valid)
  metrics = {"layout": term}
  # order of the first two groups along the axis where they differ most
  d_true, d_pred = target[:, 0] - target[:, 1], pred[:, 0] - pred[:, 1]  # [B, 2]
  axis = jnp.argmax(jnp.abs(d_true), -1)[:, None]
  dt, dp = jnp.take_along_axis(d_true, axis, -1)[:, 0], jnp.take_along_axis(d_pred, axis, -1)[:, 0]
  pair = valid[:, 0] * valid[:, 1] * (area[:, 0] < BACKGROUND_AREA) * (area[:, 1] < BACKGROUND_AREA)
  pair = pair * (jnp.abs(dt) > 0.25)
  right = (jnp.sign(dt) == jnp.sign(dp)).astype(jnp.float32)
  metrics["layout_order"] = _masked_mean(right, pair)
  if object_channel >= 0:
    is_object = (area < BACKGROUND_AREA).astype(jnp.float32) * valid  # [B, K]
    target_tok = jnp.minimum(jnp.einsum("bkl,bk->bl", sel, is_object), 1.0)  # [B, L]
    row = jnp.broadcast_to(has_group[:, None], target_tok.shape)
    logit = states[..., object_channel].astype(jnp.float32)
    bce = _masked_mean(optax.sigmoid_binary_cross_entropy(logit, target_tok), row)
    acc = _masked_mean((logit > 0) == (target_tok > 0.5), row)
    term = term + bce
    metrics.update(layout_object=bce, layout_object_acc=acc)
  if spread_channel >= 0:
    log_sigma = states[..., spread_channel].astype(jnp.float32)  # [B, L]
    place_err = jnp.sum((jax.lax.stop_gradient(xy)[:, None] - target[:, :, None]) ** 2, -1)  # [B, K, L]
    spread = second_moments(group_masks, target)[..., None] + place_err
    nll = spread * jnp.exp(-2 * log_sigma)[:, None] / 2 + 2 * log_sigma[:, None]  # [B, K, L]
    tok = sel * valid[..., None]
    nll_term = _masked_mean(nll, tok)
    obj_tok = tok * (area < BACKGROUND_AREA)[..., None]
    metrics.update(layout_spread=nll_term,
                   layout_sigma=_masked_mean(jnp.exp(log_sigma)[:, None], obj_tok))
    term = term + nll_term
  return term, metrics
