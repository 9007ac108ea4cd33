"""Independent float64 reference of the PaTH language model, written from the layer / model description in
PATH_NOTES.md ("The layer as fla builds it", "The full model"). It shares no code with path_lm: it reads the
weights by checkpoint key name from a state_dict and computes with plain torch float64 ops, with the
attention itself from reference.path_attention_reference (explicit Householder products).

Every function records the keys it reads in `used` (a set), so a test can check that the checkpoint holds
exactly the parameters the description names, no more and no fewer.
"""

import torch
import torch.nn.functional as F
from reference import path_attention_reference

QK_NORM_EPS = 1e-5
W_NORM_EPS = 1e-6
LOW_RANK = 32

ACTIVATIONS = {
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x),  # transformers' "gelu" is the exact erf form
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class Weights:
    """state_dict reader: float64 copies, records which keys were read."""

    def __init__(self, state_dict):
        self.sd = state_dict
        self.used = set()

    def __call__(self, key):
        self.used.add(key)
        return self.sd[key].detach().to(torch.float64)

    def has(self, key):
        return key in self.sd

    def unused(self):
        return set(self.sd) - self.used


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def causal_depthwise_conv(x, weight, bias=None):
    """x [B, T, C], weight [C, 1, K] (tap K-1 multiplies the current input) -> [B, T, C], before activation.
    Left padding with K-1 zeros makes F.conv1d (a cross-correlation) causal."""
    K = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), weight, bias, groups=x.shape[-1])
    return y.transpose(1, 2)


def causal_depthwise_conv_loop(x, weight, bias=None):
    """The same convolution with an explicit loop over time and taps (cross-check of the F.conv1d form)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    y = torch.zeros_like(x) if bias is None else bias.expand(B, T, C).clone()
    for t in range(T):
        for j in range(K):  # tap j reads x[t - (K - 1 - j)]
            src = t - (K - 1 - j)
            if src >= 0:
                y[:, t] = y[:, t] + weight[:, 0, j] * x[:, src]
    return y


def reference_attention(weights, prefix, x, *, hidden_size, num_heads, num_kv_heads, use_forget_gate,
                        use_qk_norm, use_low_rank_w, use_w_shortconv, conv_bias, beta_max=None):
    """fla's PaTHAttention forward (no cache, no padding) in float64. x [B, T, hidden] -> [B, T, hidden]."""
    x = x.to(torch.float64)
    B, T, _ = x.shape
    D = hidden_size // num_heads
    H, HQ = num_kv_heads, num_heads
    p = lambda name: weights(prefix + name)  # noqa: E731

    q = linear(x, p("q_proj.weight"))
    k = linear(x, p("k_proj.weight"))
    v = linear(x, p("v_proj.weight"))
    if use_low_rank_w:
        down, up = p("w_proj.0.weight"), p("w_proj.1.weight")
        assert down.shape == (LOW_RANK, hidden_size), down.shape
        w = linear(linear(x, down), up)
    else:
        w = linear(x, p("w_proj.weight"))
    if use_w_shortconv:
        conv_w = p("w_conv1d.weight")
        assert conv_w.shape[:2] == (H * D, 1), conv_w.shape
        conv_b = p("w_conv1d.bias") if conv_bias else None
        w = F.silu(causal_depthwise_conv(w, conv_w, conv_b))
    beta = 2 * torch.sigmoid(linear(x, p("bt_proj.weight"), p("bt_proj.bias")))
    if beta_max is not None:  # path_lm's optional clip of beta away from 2 (not in fla)
        beta = beta.clamp(max=beta_max)
    g = F.logsigmoid(linear(x, p("g_proj.weight"), p("g_proj.bias"))) if use_forget_gate else None

    q = q.view(B, T, HQ, D)
    k = k.view(B, T, H, D)
    v = v.view(B, T, H, D)
    w = w.view(B, T, H, D)
    if use_qk_norm:
        q = rms_norm(q, p("maybe_q_norm.weight"), QK_NORM_EPS)
        k = rms_norm(k, p("maybe_k_norm.weight"), QK_NORM_EPS)
    w = w / torch.sqrt(w.pow(2).sum(-1, keepdim=True) + W_NORM_EPS)

    o = path_attention_reference(q, k, v, w, beta, g)  # [B, T, HQ, D], scale D ** -0.5 on the gate too
    return linear(o.reshape(B, T, hidden_size), p("o_proj.weight"))


def attention_kwargs(config):
    return dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads if config.num_kv_heads is not None else config.num_heads,
        use_forget_gate=config.use_forget_gate,
        use_qk_norm=config.use_qk_norm,
        use_low_rank_w=config.use_low_rank_w,
        use_w_shortconv=config.use_w_shortconv,
        conv_bias=config.conv_bias,
        beta_max=getattr(config, "beta_max", None),
    )


def reference_hidden_states(weights, config, input_ids=None, inputs_embeds=None, prefix="model."):
    """Final normed hidden states [B, T, hidden] float64 and the list of num_layers + 1 states (embeddings,
    every block output except the last, then the final normed state), as transformers reports them."""
    if inputs_embeds is None:
        x = weights(prefix + "embeddings.weight")[input_ids]
    else:
        x = inputs_embeds.to(torch.float64)
    act = ACTIVATIONS[config.hidden_act]
    states = [x]
    for i in range(config.num_hidden_layers):
        lp = f"{prefix}layers.{i}."
        h = x + reference_attention(
            weights, lp + "attn.", rms_norm(x, weights(lp + "attn_norm.weight"), config.norm_eps),
            **attention_kwargs(config),
        )
        m = rms_norm(h, weights(lp + "mlp_norm.weight"), config.norm_eps)
        mlp = linear(act(linear(m, weights(lp + "mlp.gate_proj.weight"))) * linear(m, weights(lp + "mlp.up_proj.weight")),
                     weights(lp + "mlp.down_proj.weight"))
        x = h + mlp
        states.append(x)
    x = rms_norm(x, weights(prefix + "norm.weight"), config.norm_eps)
    states[-1] = x
    return x, states


def reference_causal_lm_logits(state_dict, config, input_ids=None, inputs_embeds=None, return_weights=False):
    """Logits [B, T, vocab] float64 of a PaTH causal LM from its state_dict (keys as fla's checkpoints)."""
    weights = Weights(state_dict)
    x, _ = reference_hidden_states(weights, config, input_ids=input_ids, inputs_embeds=inputs_embeds)
    head = weights("model.embeddings.weight") if config.tie_word_embeddings else weights("lm_head.weight")
    logits = x @ head.T
    return (logits, weights) if return_weights else logits
