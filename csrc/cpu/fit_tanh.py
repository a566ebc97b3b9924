"""The coefficients of tanh_f32 (vec_ops.cpp): tanh(y) ~= y P(y^2) / Q(y^2) on |y| <= 9, P and Q of degree 4
(Q's constant 1), fitted here for the least maximum relative error.

    python csrc/cpu/fit_tanh.py

The fit linearises P / Q - f = 0 (f = tanh(y) / y) into P - f Q = 0, solved by weighted least squares on a dense
grid; each round divides the weights by the last Q (Loeb's iteration, so that the residual is P / Q - f again)
and raises them where the relative error is largest (Lawson's), which pushes the fit towards equal ripples. It
prints the best round's coefficients rounded to float32, their relative error in float64, and the error of the
float32 evaluation (Horner, then y P / Q), which is what the kernels get: about 3e-7, a few ulp of float32's
rounding in the two sums and the division; the approximation itself is within about 2e-8.
"""
import numpy as np

CLAMP = 9.0  # float32's tanh is 1 to rounding beyond (1 - tanh(9) = 3e-8 < half an ulp below 1)
DEG = 4


def fit(rounds=60):
    y = np.linspace(1e-6, CLAMP, 200001)
    z = y * y
    f = np.tanh(y) / y
    vp = np.vander(z, DEG + 1, increasing=True)
    vq = np.vander(z, DEG + 1, increasing=True)[:, 1:]
    weight, q_last, best = np.ones_like(y), np.ones_like(y), None
    for _ in range(rounds):
        a = np.concatenate([vp, -f[:, None] * vq], axis=1)
        w = weight / (np.abs(q_last) * f)
        sol = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)[0]
        p, q = sol[: DEG + 1], np.concatenate([[1.0], sol[DEG + 1:]])
        q_last = vp @ q
        err = np.abs((vp @ p) / q_last - f) / f
        if best is None or err.max() < best[0]:
            best = (err.max(), p, q)
        weight = weight * (1 + 4 * err / err.max())
        weight /= weight.mean()
    return best


def horner32(coef, z):
    acc = np.float32(coef[-1]) * np.ones_like(z)
    for c in coef[-2::-1]:
        acc = (acc * z + np.float32(c)).astype(np.float32)
    return acc


def main():
    err, p, q = fit()
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    y = np.linspace(-CLAMP, CLAMP, 4000001).astype(np.float32)
    z = (y * y).astype(np.float32)
    t = (y * horner32(p32, z) / horner32(q32, z)).astype(np.float32)
    ref = np.tanh(y.astype(np.float64))
    nz = ref != 0
    rel32 = (np.abs(t - ref)[nz] / np.abs(ref[nz])).max()
    print(f"relative error: {err:.3g} (float64), {rel32:.3g} (float32 evaluation)")
    print("P:", ", ".join(f"{c:.9g}f" for c in p32))
    print("Q:", ", ".join(f"{c:.9g}f" for c in q32))
    assert np.all(p32 > 0) and np.all(q32 > 0), "positive coefficients: no pole, no cancellation in the sums"


if __name__ == "__main__":
    main()
