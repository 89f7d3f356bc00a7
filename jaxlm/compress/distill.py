"""Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened
next-token (or masked-token) distribution, mixed with the usual loss on the true tokens:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)
           + attention_weight * MSE(student attention maps, teacher attention maps)

per scored token, with s, t the student's and teacher's logits. The attention term compares
probability maps [B, H, T, T] of mapped layer pairs (student layer -> teacher layer; by default
evenly spaced), head by head when the head counts match, else averaged over heads. The teacher
runs without gradients. ``jaxlm train train.objective=distill distill.teacher=PATH``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(student_logits, teacher_logits, targets, *, temperature: float, alpha: float):
    """Per-token distillation loss [B, T]: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE."""
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    ce = jax.nn.logsumexp(s, axis=-1) - jnp.take_along_axis(s, targets[..., None], axis=-1)[..., 0]
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def layer_pairs(n_student: int, n_teacher: int, spec: str = "") -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs: from "s:t,s:t" or, by default, student layer i ->
    teacher layer round((i + 1) * Lt / Ls) - 1 (the last maps to the last)."""
    if not spec:
        return tuple((i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student))
    pairs = []
    for part in spec.split(","):
        try:
            s, t = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"distill.layer_map={spec!r}: write student:teacher pairs, e.g. 0:1,1:3") from None
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ValueError(f"distill.layer_map pair {part}: the student has layers 0..{n_student - 1}, "
                             f"the teacher 0..{n_teacher - 1}")
        pairs.append((s, t))
    return tuple(pairs)


def attention_mse(student_maps, teacher_maps, pairs):
    """Mean squared error between mapped layers' attention maps ([L, B, H, T, S] each)."""
    teacher_maps = jax.lax.stop_gradient(teacher_maps)
    errs = []
    for s, t in pairs:
        a, b = student_maps[s], teacher_maps[t]
        if a.shape[1] != b.shape[1]:  # different head counts: compare the head averages
            a, b = a.mean(1), b.mean(1)
        errs.append(jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))))
    return jnp.mean(jnp.stack(errs))


def check_teacher(student_config, teacher_config, role: str = "teacher") -> None:
    """A second model that scores the same tokens (distill's teacher, dpo's reference): same
    vocabulary, same kind (decoder or encoder)."""
    model = "student" if role == "teacher" else "model"
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(f"the {role}'s vocabulary has {teacher_config.vocab_size} tokens but the {model}'s "
                         f"{student_config.vocab_size}; it needs the same tokenizer")
    if teacher_config.causal != student_config.causal:
        raise ValueError(f"the {role} ({teacher_config.arch}) and the {model} ({student_config.arch}) must both be "
                         "decoders or both encoders")
