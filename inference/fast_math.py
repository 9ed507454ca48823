"""Elementwise math that runs fast on MLX's CPU backend, for every device.

MLX's CPU backend evaluates exp, erf, tanh and sigmoid one element at a time (~20-30 ns each
on this project's 2-core x86 machine: 30-40 Melem/s, against ~2,000 for a multiply), so a
model's activations and softmaxes can cost more than its matrix products. Its compiled
(fused) loops are SIMD when the inputs are contiguous and the body is free of min / max /
where (their NaN checks keep the C++ compiler scalar), so each function here is written as a
polynomial or rational function in that form, compiled per shape: 300+ Melem/s. The first
call on a machine JIT-compiles with the system C++ compiler (seconds, cached under
$TMPDIR/mlx); later shapes reuse the built loops.

Accuracy is float32-level: |error| < 2e-7 for erf, < 3e-7 for tanh (Eigen's approximations).
"""

from __future__ import annotations

import math

import mlx.core as mx

# Rational approximation of erf on [-4, 4] (Eigen's generic_fast_erf_float); |error| < 2e-7.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip
# GELU(x) = x (0.5 + 0.5 erf(x / sqrt 2)); erf(z) = z P(z^2) / Q(z^2); 0.5 z P = x P / (2 sqrt 2).
_GELU_P = tuple(c / (2.0 * math.sqrt(2.0)) for c in _ERF_P)
_GELU_CLIP = 4.0 * math.sqrt(2.0)
# exp(x) for x in [-20, 0] as (Taylor(x/32))^32; below -20 a probability ratio is < 2e-9: use 0.
_EXP_FLOOR = -20.0
_EXP_SQUARINGS = 5
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(10))


def _gelu_erf(x: mx.array) -> mx.array:
    # Written so MLX fuses it into contiguous, SIMD loops: no min / max / where (their NaN
    # checks keep the compiler scalar; clip is |x + a| - |x - a|), and Estrin-form polynomials
    # in w = z^2 with z = x / sqrt(2) folded into the coefficients (shallow enough for few
    # kernels): 2x faster than Horner with clip.
    c = (mx.abs(x + _GELU_CLIP) - mx.abs(x - _GELU_CLIP)) * 0.5  # x clipped to +-4 sqrt(2)
    w = c * c * 0.5  # z^2
    return x * (0.5 + c * _estrin(w, _GELU_P) / _estrin(w, _ERF_Q))


def _estrin(w: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """The polynomial in w with these coefficients (highest power first), in Estrin's form:
    pairs, then pairs of pairs, so the dependency chain is log-deep instead of linear."""
    low_first = coefficients[::-1]
    terms = [
        low_first[i] + low_first[i + 1] * w if i + 1 < len(low_first) else low_first[i]
        for i in range(0, len(low_first), 2)
    ]
    power = w
    while len(terms) > 1:
        power = power * power
        terms = [
            terms[i] + power * terms[i + 1] if i + 1 < len(terms) else terms[i]
            for i in range(0, len(terms), 2)
        ]
    return terms[0]


def _exp_nonpositive(d: mx.array) -> mx.array:
    y = mx.maximum(d, _EXP_FLOOR) * (0.5**_EXP_SQUARINGS)
    p = _EXP_TAYLOR[-1]
    for c in _EXP_TAYLOR[-2::-1]:
        p = p * y + c
    for _ in range(_EXP_SQUARINGS):
        p = p * p
    return mx.where(d > _EXP_FLOOR, p, 0.0)


def _softmax_numerator(scores: mx.array) -> mx.array:
    """exp(scores - rowmax), exactly 0 for masked (-inf) keys; the caller divides by the sum."""
    return _exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))


# Shape-specialised compiles: each shape gets one fused loop (shapeless ones run strided, slower).
gelu_erf = mx.compile(_gelu_erf)
softmax_numerator = mx.compile(_softmax_numerator)


# tanh(x) = x P(x^2) / Q(x^2) on [-7.905, 7.905], where float32 tanh reaches +-1 (Eigen's
# ptanh_float); |error| < 3e-7.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)  # fmt: skip
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)  # fmt: skip
_TANH_CLIP = 7.90531110763549805


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # silu(g) * u with silu(g) = g sigmoid(g) = h (1 + tanh(h)), h = g / 2: one rational
    # function, clipped with abs (see _gelu_erf), no exp.
    h = gate * 0.5
    c = (mx.abs(h + _TANH_CLIP) - mx.abs(h - _TANH_CLIP)) * 0.5
    w = c * c
    return h * (1.0 + c * _estrin(w, _TANH_P) / _estrin(w, _TANH_Q)) * up


swiglu = mx.compile(_swiglu)


# exp(d) for d in [-30, 0] as (Taylor(d / 64))^64: |relative error| < 1e-6; below -30 (a weight
# under 1e-13 of the row's best) exactly 0.
_SHIFTED_FLOOR = 30.0
_SHIFTED_SQUARINGS = 6
_SHIFTED_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(10))


def _exp_shifted(d: mx.array) -> mx.array:
    # d = scores - rowmax <= 0, finite and above -1e6 (the abs-based clip is exact there).
    c = (d - _SHIFTED_FLOOR + mx.abs(d + _SHIFTED_FLOOR)) * 0.5  # max(d, -30)
    y = c * (0.5**_SHIFTED_SQUARINGS)
    p = _SHIFTED_TAYLOR[-1]
    for coefficient in _SHIFTED_TAYLOR[-2::-1]:
        p = p * y + coefficient
    for _ in range(_SHIFTED_SQUARINGS):
        p = p * p
    return p * (d > -_SHIFTED_FLOOR)


exp_shifted = mx.compile(_exp_shifted)
