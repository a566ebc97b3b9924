"""A numpy model of the warp-level fragment code of flash_common.cuh.

    python csrc/cuda/fragment_model.py

load_a / load_b2 / gemm_ss / gemm_rs below repeat the address formulas of
flash_common.cuh line for line, and ldsm_x4 / mma model the PTX semantics of
ldmatrix(.trans) and mma.sync m16n8k16 (f16/bf16) and m16n8k8 (tf32) as the
PTX ISA describes the fragments. Every combination of operand layouts (k- or
m/n-contiguous A and B) and both register-P products (including the TF32 k
permutation) must reproduce A @ B exactly. It checks the index algebra without
a GPU; keep it in step with flash_common.cuh when the fragment code changes.
"""
import numpy as np
rng = np.random.default_rng(0)

def ldsm_x4(smem, addrs, esz, trans):
    """addrs[lane] = element index (of size esz bytes) of the row start that lane supplies.
    Returns regs[lane][i] = list of the 16-bit-unit elements, as a tuple of values (2 b16 or 1 fp32)."""
    regs = [[None]*4 for _ in range(32)]
    per_row = 8 if esz == 2 else 4   # elements per 16-byte row
    for i in range(4):
        rows = [addrs[8*i + r] for r in range(8)]
        # matrix of 8 rows x 8 b16; for fp32: 8 rows x 4 floats (each 2 b16)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if esz == 2:
                if not trans:
                    vals = (smem[rows[g] + 2*t], smem[rows[g] + 2*t + 1])
                else:
                    vals = (smem[rows[2*t] + g], smem[rows[2*t+1] + g])
            else:
                assert not trans
                vals = (smem[rows[g] + t],)
            regs[lane][i] = vals
    return regs

def load_a(smem, base, ld, m0, k0, KMAJOR, esz):
    if esz == 2:
        addrs = []
        for lane in range(32):
            i, r = lane >> 3, lane & 7
            if KMAJOR: addrs.append(base + (m0 + r + 8*(i & 1))*ld + k0 + 8*(i >> 1))
            else: addrs.append(base + (k0 + r + 8*(i >> 1))*ld + m0 + 8*(i & 1))
        regs = ldsm_x4(smem, addrs, 2, not KMAJOR)
        return [[x for reg in regs[l] for x in reg] for l in range(32)]  # 8 values a0..a7
    else:
        if KMAJOR:
            addrs = []
            for lane in range(32):
                i, r = lane >> 3, lane & 7
                addrs.append(base + (m0 + r + 8*(i & 1))*ld + k0 + 4*(i >> 1))
            regs = ldsm_x4(smem, addrs, 4, False)
            return [[reg[0] for reg in regs[l]] for l in range(32)]
        out = []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            p0 = base + (k0 + t)*ld + m0 + g; p1 = p0 + 4*ld
            out.append([smem[p0], smem[p0+8], smem[p1], smem[p1+8]])
        return out

def load_b2(smem, base, ld, n0, k0, KMAJOR, esz):
    if esz == 2:
        addrs = []
        for lane in range(32):
            i, r = lane >> 3, lane & 7
            if KMAJOR: addrs.append(base + (n0 + r + 8*(i >> 1))*ld + k0 + 8*(i & 1))
            else: addrs.append(base + (k0 + r + 8*(i & 1))*ld + n0 + 8*(i >> 1))
        regs = ldsm_x4(smem, addrs, 2, not KMAJOR)
        b0 = [list(regs[l][0]) + list(regs[l][1]) for l in range(32)]
        b1 = [list(regs[l][2]) + list(regs[l][3]) for l in range(32)]
        return b0, b1
    else:
        if KMAJOR:
            addrs = []
            for lane in range(32):
                i, r = lane >> 3, lane & 7
                addrs.append(base + (n0 + r + 8*(i >> 1))*ld + k0 + 4*(i & 1))
            regs = ldsm_x4(smem, addrs, 4, False)
            return [[regs[l][0][0], regs[l][1][0]] for l in range(32)], [[regs[l][2][0], regs[l][3][0]] for l in range(32)]
        b0, b1 = [], []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            p0 = base + (k0 + t)*ld + n0 + g; p1 = p0 + 4*ld
            b0.append([smem[p0], smem[p1]]); b1.append([smem[p0+8], smem[p1+8]])
        return b0, b1

def mma(c, a, b, esz):
    """c[lane][4], a[lane][8 or 4], b[lane][4 or 2]: PTX m16n8k16 (f16) / m16n8k8 (tf32)."""
    K = 16 if esz == 2 else 8
    A = np.zeros((16, K)); B = np.zeros((K, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if esz == 2:
            for idx in range(8):
                row = g + 8*((idx >> 1) & 1); col = 2*t + (idx & 1) + 8*(idx >> 2)
                A[row, col] = a[lane][idx]
            for idx in range(4):
                B[2*t + (idx & 1) + 8*(idx >> 1), g] = b[lane][idx]
        else:
            A[g, t] = a[lane][0]; A[g+8, t] = a[lane][1]; A[g, t+4] = a[lane][2]; A[g+8, t+4] = a[lane][3]
            B[t, g] = b[lane][0]; B[t+4, g] = b[lane][1]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane][0] += C[g, 2*t]; c[lane][1] += C[g, 2*t+1]; c[lane][2] += C[g+8, 2*t]; c[lane][3] += C[g+8, 2*t+1]

def frag_to_mat(acc, MT, NT):
    M = np.zeros((16*MT, 8*NT))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for mt in range(MT):
            for nt in range(NT):
                for r in range(4):
                    M[16*mt + g + 8*(r >> 1), 8*nt + 2*t + (r & 1)] = acc[lane][mt][nt][r]
    return M

def gemm_ss(smem, sA, lda, sB, ldb, MT, NT, KD, AK, BK, esz):
    kK = 16 if esz == 2 else 8
    acc = [[[[0.0]*4 for _ in range(NT)] for _ in range(MT)] for _ in range(32)]
    for k0 in range(0, KD, kK):
        a = [load_a(smem, sA, lda, 16*mt, k0, AK, esz) for mt in range(MT)]
        for np_ in range(NT//2):
            b0, b1 = load_b2(smem, sB, ldb, 16*np_, k0, BK, esz)
            for mt in range(MT):
                c0 = [acc[l][mt][2*np_] for l in range(32)]; c1 = [acc[l][mt][2*np_+1] for l in range(32)]
                mma(c0, a[mt], b0, esz); mma(c1, a[mt], b1, esz)
    return acc

def test_ss(esz, AK, BK, MT=2, NT=4, KD=32):
    M, N = 16*MT, 8*NT
    A = rng.integers(-3, 4, size=(M, KD)).astype(float); B = rng.integers(-3, 4, size=(KD, N)).astype(float)
    pad = 8 if esz == 2 else 4
    smem = np.zeros(100000)
    # A region
    sA = 1000
    if AK: lda = KD + pad; [smem.__setitem__(sA + m*lda + k, A[m, k]) for m in range(M) for k in range(KD)]
    else: lda = M + pad; [smem.__setitem__(sA + k*lda + m, A[m, k]) for m in range(M) for k in range(KD)]
    sB = 50000
    if BK: ldb = KD + pad; [smem.__setitem__(sB + n*ldb + k, B[k, n]) for n in range(N) for k in range(KD)]
    else: ldb = N + pad; [smem.__setitem__(sB + k*ldb + n, B[k, n]) for n in range(N) for k in range(KD)]
    acc = gemm_ss(smem, sA, lda, sB, ldb, MT, NT, KD, AK, BK, esz)
    got = frag_to_mat(acc, MT, NT)
    assert np.array_equal(got, A @ B), (esz, AK, BK)
    print("gemm_ss ok", esz, AK, BK)

def test_rs(esz, MT=2, NTP=4, NTO=4):
    # P from accumulators (as if an m16n8 C layout), V [key][e] in smem
    P = rng.integers(-3, 4, size=(16*MT, 8*NTP)).astype(float)
    V = rng.integers(-3, 4, size=(8*NTP, 8*NTO)).astype(float)
    pad = 8 if esz == 2 else 4; ldv = 8*NTO + pad
    smem = np.zeros(100000); sV = 100
    for kk in range(8*NTP):
        for e in range(8*NTO): smem[sV + kk*ldv + e] = V[kk, e]
    p = [[[[P[16*mt + (lane>>2) + 8*(r>>1), 8*nt + 2*(lane&3) + (r&1)] for r in range(4)] for nt in range(NTP)] for mt in range(MT)] for lane in range(32)]
    acc = [[[[0.0]*4 for _ in range(NTO)] for _ in range(MT)] for _ in range(32)]
    if esz == 2:
        for kk in range(NTP//2):
            a = [[ [p[l][mt][2*kk][0], p[l][mt][2*kk][1], p[l][mt][2*kk][2], p[l][mt][2*kk][3],
                     p[l][mt][2*kk+1][0], p[l][mt][2*kk+1][1], p[l][mt][2*kk+1][2], p[l][mt][2*kk+1][3]] for l in range(32)] for mt in range(MT)]
            for np_ in range(NTO//2):
                b0, b1 = load_b2(smem, sV, ldv, 16*np_, 16*kk, False, 2)
                for mt in range(MT):
                    mma([acc[l][mt][2*np_] for l in range(32)], a[mt], b0, 2)
                    mma([acc[l][mt][2*np_+1] for l in range(32)], a[mt], b1, 2)
    else:
        for kk in range(NTP):
            a = [[[p[l][mt][kk][0], p[l][mt][kk][2], p[l][mt][kk][1], p[l][mt][kk][3]] for l in range(32)] for mt in range(MT)]
            for np_ in range(NTO//2):
                b0, b1 = [], []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    v0 = sV + (8*kk + 2*t)*ldv + g; v1 = v0 + ldv
                    b0.append([smem[v0 + 16*np_], smem[v1 + 16*np_]]); b1.append([smem[v0 + 16*np_ + 8], smem[v1 + 16*np_ + 8]])
                for mt in range(MT):
                    mma([acc[l][mt][2*np_] for l in range(32)], a[mt], b0, 4)
                    mma([acc[l][mt][2*np_+1] for l in range(32)], a[mt], b1, 4)
    got = frag_to_mat(acc, MT, NTO)
    assert np.array_equal(got, P @ V), esz
    print("gemm_rs ok", esz)

if __name__ == "__main__":
    for esz in (2, 4):
        for AK in (True, False):
            for BK in (True, False):
                test_ss(esz, AK, BK)
                test_ss(esz, AK, BK, MT=1, NT=2, KD=64)
        test_rs(esz)
        test_rs(esz, MT=1, NTP=2, NTO=8)
