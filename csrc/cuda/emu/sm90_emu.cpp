// The Hopper PTX of hopper/sm90_ptx.cuh on the SIMT emulator (see sm90_emu.h
// for the model). Everything here follows the PTX ISA; the sections are cited
// where each rule is implemented.
#include "sm90_emu.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "ptx_emu.h"
#include "racecheck.h"

namespace attention_ext {
namespace cuda {
namespace sm90 {
namespace {

using simt::Error;
namespace race = simt::race;

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof(b), "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

// ---------------------------------------------------------------------------
// State of one CTA.

// PTX ISA 9.7.13.15.2 "Contents of the mbarrier object": current phase,
// pending arrivals of the current phase, expected arrivals (reloaded at each
// phase completion), tx-count. Counts are limited to 2^20 - 1 (tx-count to
// +-(2^20 - 1)).
constexpr int64_t kMbarMax = (int64_t(1) << 20) - 1;
struct Mbar {
  uint32_t expected = 0;
  uint32_t pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // phases completed so far; parity = phase & 1
  race::Clock acc;      // racecheck: the arrivals (and landed copies) of the current phase
  race::Clock done[2];  // ... of the last completed phase of each parity
};

struct TmaCopy {
  uint32_t dst;
  TmaDesc desc;
  int c[4];
  uint32_t bytes;
  race::Epoch by;     // racecheck: the issuing thread at issue (the landed write's epoch)
  race::Clock clock;  // ... and its clock, which the complete-tx releases into the mbarrier
};

// One wgmma.mma_async of a warpgroup: what must be uniform, and each thread's
// registers.
struct WgOp {
  int n, kind, ta, tb;
  bool a_regs;
  uint64_t da, db;
  int scale_d;
  int issued = 0;
  float* d[128] = {};
  uint32_t a[128][4] = {};
};

struct Warpgroup {
  std::deque<WgOp> ops;  // ops[0] is op number `executed`
  uint64_t executed = 0;
  std::vector<race::Epoch> exec;  // racecheck: the epoch at which op i executed (acquired by the waits for it)
};

// One cp.reduce.async.bulk.tensor (add) of a thread, not yet performed.
struct TmaReduce {
  uint32_t src;
  TmaDesc desc;
  int c[4];
  uint32_t bytes;
};

struct ThreadWg {
  std::vector<TmaReduce> bulk_open;              // issued, not yet committed
  std::deque<std::vector<TmaReduce>> bulk_groups;  // committed, not yet performed (late), oldest first
  uint64_t issued = 0;           // ops issued by this thread
  std::deque<uint64_t> groups;   // committed groups, oldest first: op count at commit
  uint64_t waited = 0;           // ops covered by a completed wait_group
  uint64_t acquired = 0;         // racecheck: the ops whose execution this thread acquired
  bool fenced = false;
};

struct NamedBar {
  int expected = 0;
  int arrived = 0;
  uint64_t gen = 0;
  race::Clock acc, done[2];  // racecheck: arrivals of the current generation; the last two completed
};

struct State : simt::CtaState {
  // the async proxy's view of shared memory (see sm90_emu.h, proxies): made
  // at the first async access as the CTA's shared memory starts (the 0xff
  // fill of simt.cpp), then refreshed from the generic view at the first async
  // read after a fence_proxy_async
  std::vector<unsigned char> async_view;
  bool fence_pending = false;
  std::map<uint32_t, Mbar> bars;
  std::map<uint32_t, std::vector<TmaCopy>> in_flight;  // late TMA copies per mbarrier, issue order
  std::vector<Warpgroup> wgs;
  std::vector<ThreadWg> threads;
  NamedBar named[16];

  void thread_exit(int rank) override {
    if (rank < static_cast<int>(threads.size()) &&
        (!threads[rank].bulk_groups.empty() || !threads[rank].bulk_open.empty())) {
      throw Error(simt::where() + ": thread exits with bulk async copies (cp.reduce.async.bulk) it has not waited "
                  "for (cp.async.bulk.commit_group + cp.async.bulk.wait_group)");
    }
    if (rank < static_cast<int>(threads.size()) && threads[rank].issued != threads[rank].waited) {
      throw Error(simt::where() + ": thread exits with " + std::to_string(threads[rank].issued - threads[rank].waited) +
                  " wgmma.mma_async ops it has not waited for (wgmma.commit_group + wgmma.wait_group)");
    }
  }
};

State& state() {
  auto* s = static_cast<State*>(simt::cta_state(0));
  if (s == nullptr) {
    auto fresh = std::make_unique<State>();
    s = fresh.get();
    const int n = simt::num_threads();
    s->wgs.resize(static_cast<size_t>((n + 127) / 128));
    s->threads.resize(static_cast<size_t>(n));
    simt::set_cta_state(0, std::move(fresh));
  }
  return *s;
}

// Shared memory as the async proxy reads it (wgmma operands, TMA reduce
// sources): the generic view as of the first async read after the latest
// fence.proxy.async.
std::vector<unsigned char>& async_view() {
  State& st = state();
  if (st.async_view.empty()) st.async_view.assign(simt::dynamic_smem_bytes(), 0xff);
  return st.async_view;
}

const unsigned char* async_smem() {
  std::vector<unsigned char>& v = async_view();
  State& st = state();
  if (st.fence_pending) {
    std::memcpy(v.data(), simt::dynamic_smem(), v.size());
    st.fence_pending = false;
  }
  return v.data();
}

// An async-proxy write (TMA load) of `bytes` at shared address a: both views.
void async_write(uint32_t a, const void* src, size_t bytes) {
  std::memcpy(simt::dynamic_smem() + a, src, bytes);
  std::memcpy(async_view().data() + a, src, bytes);
}

// ---------------------------------------------------------------------------
// mbarrier (PTX ISA 9.7.13.15).

std::string bar_name(uint32_t bar) { return "mbarrier at smem " + hex(bar); }

// 9.7.13.15.1 "Size and alignment of mbarrier object": 8 bytes, 8-byte aligned, in shared memory.
Mbar& mbar(uint32_t bar, const char* op) {
  if (bar % 8 != 0 || bar + size_t(8) > simt::dynamic_smem_bytes()) {
    throw Error(simt::where() + ": " + op + " on " + bar_name(bar) +
                ", which is not an 8-byte aligned object inside the " + std::to_string(simt::dynamic_smem_bytes()) +
                " bytes of dynamic shared memory");
  }
  State& s = state();
  auto it = s.bars.find(bar);
  if (it == s.bars.end()) {
    throw Error(simt::where() + ": " + op + " on an uninitialised " + bar_name(bar) +
                " (no mbarrier.init in this CTA)");
  }
  return it->second;
}

std::string describe(uint32_t bar, const Mbar& m) {
  return bar_name(bar) + " (phase " + std::to_string(m.phase) + ", " + std::to_string(m.pending) + " of " +
         std::to_string(m.expected) + " arrivals pending, tx-count " + std::to_string(m.tx) + ")";
}

// 9.7.13.15.6 "Phase Completion": pending arrivals 0 and tx-count 0; then the
// phase advances and the pending count is reloaded with the expected count.
void try_complete(uint32_t bar, Mbar& m) {
  if (m.pending == 0 && m.tx < 0) {
    // A valid transient state while arrivals are pending (complete-tx may
    // precede expect-tx, 9.7.13.15.2 allows a negative tx-count), but with no
    // arrival left nothing in this API can raise tx-count again.
    throw Error(simt::where() + ": " + describe(bar, m) +
                ": more transaction bytes completed than expected in this phase (the phase can never complete)");
  }
  if (m.pending == 0 && m.tx == 0) {
    m.done[m.phase & 1] = std::move(m.acc);
    m.acc.clear();
    ++m.phase;
    m.pending = m.expected;
  }
}

// complete-tx (9.7.13.15.5 "Tracking asynchronous operations")
void complete_tx(uint32_t bar, Mbar& m, uint32_t bytes) {
  m.tx -= bytes;
  if (m.tx < -kMbarMax) throw Error(simt::where() + ": tx-count below -(2^20 - 1) on " + describe(bar, m));
  try_complete(bar, m);
}

// arrive-on (9.7.13.15.4); expect-tx first if bytes > 0 (mbarrier.arrive.expect_tx, 9.7.13.15.13)
void arrive(uint32_t bar, uint32_t bytes, const char* op) {
  Mbar& m = mbar(bar, op);
  if (bytes > 0) {
    m.tx += bytes;
    if (m.tx > kMbarMax) throw Error(simt::where() + ": " + op + ": tx-count above 2^20 - 1 on " + describe(bar, m));
  }
  if (m.pending == 0) {
    throw Error(simt::where() + ": " + op + " on " + describe(bar, m) +
                ": more arrivals than pending in the current phase");
  }
  --m.pending;
  race::release(m.acc);
  try_complete(bar, m);
}

// ---------------------------------------------------------------------------
// TMA: the tiled mode of 5.5.3 and the swizzling modes of 5.5.7.

int swizzle_bytes(int sw) { return sw == 1 ? 128 : sw == 2 ? 64 : sw == 3 ? 32 : 0; }

// 5.5.7: with the 32/64/128-byte swizzle, the 16-byte chunk index inside each
// 128-byte line of shared memory (address bits 4..6) is XORed with the line
// index modulo 2/4/8 (address bits 7..9), i.e. CuTe's Swizzle<1|2|3, 4, 3> on
// byte addresses; the pattern repeats every 256/512/1024 bytes.
uint32_t swizzle_addr(uint32_t addr, int sw) {
  const int bits = sw == 1 ? 3 : sw == 2 ? 2 : sw == 3 ? 1 : 0;
  const uint32_t mask = (1u << bits) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

// The rows of a box at coordinates c (dimensions 1..3; dimension 0 is the row): fn(off, row, lo, hi) for each in
// order, off: the row's first byte in the box (dimension 0 fastest); row: its first byte in global memory, or
// nullptr where the row lies outside the tensor; [lo, hi): the elements of the row inside the tensor (box-relative).
template <class Fn>
void for_box_rows(const TmaDesc& d, const int c[4], Fn&& fn) {
  const int eb = d.elem_bytes;
  auto* gbase = static_cast<unsigned char*>(const_cast<void*>(d.base));
  const int64_t box0 = d.box[0];
  const int64_t lo = std::min(std::max<int64_t>(-int64_t(c[0]), 0), box0);
  const int64_t hi = std::max(std::min(static_cast<int64_t>(d.dims[0]) - c[0], box0), lo);
  uint64_t off = 0;
  for (uint32_t i3 = 0; i3 < d.box[3]; ++i3) {
    for (uint32_t i2 = 0; i2 < d.box[2]; ++i2) {
      for (uint32_t i1 = 0; i1 < d.box[1]; ++i1, off += static_cast<uint64_t>(d.box[0]) * eb) {
        const int64_t x[4] = {0, int64_t(c[1]) + i1, int64_t(c[2]) + i2, int64_t(c[3]) + i3};
        bool row_in = true;
        int64_t row_byte = int64_t(c[0]) * eb;
        for (int k = 1; k < 4; ++k) {
          row_in = row_in && x[k] >= 0 && x[k] < static_cast<int64_t>(d.dims[k]);
          row_byte += x[k] * static_cast<int64_t>(d.strides[k]);
        }
        fn(off, row_in ? gbase + row_byte : nullptr, lo, hi);
      }
    }
  }
}

void perform(uint32_t bar, const TmaCopy& c) {
  const int eb = c.desc.elem_bytes;
  for_box_rows(c.desc, c.c, [&](uint64_t off, const unsigned char* row, int64_t lo, int64_t hi) {
    if (row != nullptr && hi > lo && !simt::global_read_ok(row + lo * eb, static_cast<size_t>((hi - lo) * eb))) {
      throw Error(simt::where() + ": TMA load (completing on " + bar_name(bar) +
                  ") reads global memory outside every tensor of the launch");
    }
    for (uint32_t i0 = 0; i0 < c.desc.box[0]; ++i0, off += eb) {
      const uint32_t a = swizzle_addr(c.dst + static_cast<uint32_t>(off), c.desc.swizzle);
      static const unsigned char kZero[8] = {};
      const bool in = row != nullptr && i0 >= lo && i0 < hi;
      async_write(a, in ? row + int64_t(i0) * eb : kZero, static_cast<size_t>(eb));  // else 5.5.3.3 zero fill
    }
  });
}

// A TMA load's bytes land and complete its transactions on `bar` (racecheck:
// the issuing thread's write, at its issue epoch; its clock released into the phase).
void land_copy(uint32_t bar, const TmaCopy& c, bool was_in_flight) {
  perform(bar, c);
  if (was_in_flight) race::in_flight(c.dst, c.bytes, true, -1);
  race::record(c.dst, c.bytes, true, c.by, "a TMA load");
  Mbar& m = mbar(bar, "TMA complete-tx");
  race::join(m.acc, c.clock);
  complete_tx(bar, m, c.bytes);
}

// Lands the late copies of `bar` (the latest moment: a thread is waiting on it).
void land(uint32_t bar) {
  State& s = state();
  auto it = s.in_flight.find(bar);
  if (it == s.in_flight.end() || it->second.empty()) return;
  std::vector<TmaCopy> copies = std::move(it->second);
  it->second.clear();
  for (const TmaCopy& c : copies) land_copy(bar, c, true);
}

// ---------------------------------------------------------------------------
// wgmma (PTX ISA 9.7.15.5).

struct MatDesc {
  uint32_t start, lbo, sbo;
  int base_offset, swizzle;
};

// 9.7.15.5.1.2.2 "Matrix Descriptor Format": bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte
// offset >> 4, 49-51 base offset, 62-63 swizzle (0 none, 1 128B, 2 64B, 3 32B).
MatDesc decode(uint64_t d) {
  return {static_cast<uint32_t>(d & 0x3fff) << 4, static_cast<uint32_t>((d >> 16) & 0x3fff) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3fff) << 4, static_cast<int>((d >> 49) & 7), static_cast<int>(d >> 62)};
}

// Shared-memory byte address of element (mn, k) of a 16-bit operand (A: mn = m
// in 0..63; B: mn = n), k in 0..15, per the canonical layouts of
// 9.7.15.5.1.2.1.3 (CuTe notation, T = 8 elements = 16 bytes):
//   K-major,  no swizzle: ((8,m),(T,2k)):((1T,SBO),(1,LBO))
//       8x16-byte core matrices; row r of a core matrix at +16r; the next 8
//       rows (mn) at +SBO; the second 8 k at +LBO.
//   K-major,  32/64/128B swizzle: ((8,m),(T,2k)):((nT,SBO),(1,T)), n = 2/4/8
//       rows of the swizzle width (n*16 bytes) with k contiguous; the next 8
//       rows at +SBO; LBO unused.
//   MN-major, no swizzle: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
//       core matrices of 8 k-rows x 8 contiguous mn; the next 8 mn at +SBO;
//       the next 8 k at +LBO.
//   MN-major, 32/64/128B swizzle: ((T,n,m),(8,k)):((1,T,LBO),(nT,SBO))
//       k-rows of n*8 contiguous mn (the swizzle width); the next n*8 mn at
//       +LBO; the next 8 k at +SBO.
// then the swizzle (Swizzle<1|2|3,4,3>) on the byte address, the same
// function of the address as TMA's (5.5.7), so a k16 step inside a swizzle
// row is a start address + 32 bytes.
uint32_t operand_addr(const MatDesc& md, bool mn_major, int mn, int k) {
  const int swb = swizzle_bytes(md.swizzle);
  uint32_t off;
  if (!mn_major) {
    if (swb == 0) {
      off = (mn % 8) * 16 + (mn / 8) * md.sbo + (k % 8) * 2 + (k / 8) * md.lbo;
    } else {
      off = (mn % 8) * swb + (mn / 8) * md.sbo + k * 2;
    }
  } else {
    if (swb == 0) {
      off = (mn % 8) * 2 + (mn / 8) * md.sbo + (k % 8) * 16 + (k / 8) * md.lbo;
    } else {
      const int e = swb / 2;  // elements per swizzle row
      off = (mn % e) * 2 + (mn / e) * md.lbo + (k % 8) * swb + (k / 8) * md.sbo;
    }
  }
  return md.swizzle == 0 ? md.start + off : swizzle_addr(md.start + off, md.swizzle);
}

float elem(uint32_t bits, int kind) { return kind == 0 ? emu_detail::f16_bits(bits) : emu_detail::bf16_bits(bits); }

// Reads operand `which` (A: 64 x 16, B: 16 x N as out[k * n + j]) from shared memory.
void read_operand(uint64_t desc, bool mn_major, int rows, int kind, const char* which, int wg, uint64_t op,
                  std::vector<float>& out, bool is_b) {
  const MatDesc md = decode(desc);
  const size_t bytes = simt::dynamic_smem_bytes();
  const unsigned char* smem = async_smem();
  auto fail = [&](const std::string& why) {
    throw Error(simt::where() + ": wgmma.mma_async op #" + std::to_string(op) + " of warpgroup " + std::to_string(wg) +
                ": operand " + which + " (descriptor " + hex(desc) + "): " + why);
  };
  if (md.base_offset != 0) fail("a nonzero matrix base offset is not emulated (every swizzle atom must be aligned)");
  if (md.start % 16 != 0) fail("the matrix start address is not 16-byte aligned");  // 9.7.15.5.1
  for (int mn = 0; mn < rows; ++mn) {
    for (int k = 0; k < 16; ++k) {
      const uint32_t a = operand_addr(md, mn_major, mn, k);
      if (a + size_t(2) > bytes) {
        fail("element (" + std::string(is_b ? "k " : "m ") + std::to_string(is_b ? k : mn) + ", " +
             (is_b ? "n " : "k ") + std::to_string(is_b ? mn : k) + ") at smem " + hex(a) + " is outside the " +
             std::to_string(bytes) + " bytes of dynamic shared memory");
      }
      uint16_t v;
      std::memcpy(&v, smem + a, 2);
      if (is_b) {
        out[static_cast<size_t>(k) * rows + mn] = elem(v, kind);
      } else {
        out[static_cast<size_t>(mn) * 16 + k] = elem(v, kind);
      }
    }
  }
}

// racecheck: the shared-memory elements an op reads (A unless from
// registers, then B), each passed to fn(address, "operand"); those outside
// shared memory are left to read_operand's check.
template <typename Fn>
void for_operand_elems(const WgOp& op, Fn&& fn) {
  const size_t bytes = simt::dynamic_smem_bytes();
  auto walk = [&](uint64_t desc, bool mn_major, int rows, const char* what) {
    const MatDesc md = decode(desc);
    if (md.base_offset != 0 || md.start % 16 != 0) return;
    for (int mn = 0; mn < rows; ++mn) {
      for (int k = 0; k < 16; ++k) {
        const uint32_t a = operand_addr(md, mn_major, mn, k);
        if (a + size_t(2) <= bytes) fn(a, what);
      }
    }
  };
  if (!op.a_regs) walk(op.da, op.ta != 0, 64, "a wgmma A operand");
  walk(op.db, op.tb != 0, op.n, "a wgmma B operand");
}

// Executes op (all 128 threads issued it): D = A B + (scale_d ? D : 0).
void execute(int wg, uint64_t num, const WgOp& op) {
  if (race::on()) {  // its reads end here, at the epoch of the thread whose wait (or issue) executes it
    const race::Epoch e = race::now();
    for_operand_elems(op, [&](uint32_t a, const char* what) {
      race::in_flight(a, 2, false, -1);
      race::record(a, 2, false, e, what);
    });
    std::vector<race::Epoch>& exec = state().wgs[wg].exec;
    if (exec.size() <= num) exec.resize(num + 1);
    exec[num] = e;
  }
  const int n = op.n;
  std::vector<float> A(64 * 16), B(static_cast<size_t>(16) * n);
  if (op.a_regs) {
    // 9.7.15.5.1.1.1, Figure 148: warp w of the warpgroup holds rows
    // 16w..16w+15 as the mma.m16n8k16 A fragment: g = lane / 4, q = lane % 4,
    // reg0 (g, 2q..2q+1), reg1 (g+8, 2q..), reg2 (g, 2q+8..), reg3 (g+8, 2q+8..),
    // the lower k in the low half.
    for (int t = 0; t < 128; ++t) {
      const int w = t / 32, g = (t % 32) / 4, q = t % 4;
      for (int r = 0; r < 4; ++r) {
        const int m = 16 * w + g + 8 * (r % 2), k0 = 2 * q + 8 * (r / 2);
        A[m * 16 + k0] = elem(op.a[t][r] & 0xffffu, op.kind);
        A[m * 16 + k0 + 1] = elem(op.a[t][r] >> 16, op.kind);
      }
    }
  } else {
    read_operand(op.da, op.ta != 0, 64, op.kind, "A", wg, num, A, false);
  }
  read_operand(op.db, op.tb != 0, n, op.kind, "B", wg, num, B, true);
  // Accumulator D (9.7.15.5.1.1.1, Figure 149): thread t (warp w, g = lane / 4,
  // q = lane % 4) holds d[4j + 0/1] = (16w + g, 8j + 2q + 0/1) and
  // d[4j + 2/3] = (16w + g + 8, 8j + 2q + 0/1).
  std::vector<float> out(static_cast<size_t>(64) * n);
  for (int t = 0; t < 128; ++t) {
    const int w = t / 32, g = (t % 32) / 4, q = t % 4;
    for (int i = 0; i < n / 2; ++i) {
      const int j = i / 4, m = 16 * w + g + 8 * ((i % 4) / 2), col = 8 * j + 2 * q + i % 2;
      double acc = op.scale_d ? static_cast<double>(op.d[t][i]) : 0.0;
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[m * 16 + k]) * B[static_cast<size_t>(k) * n + col];
      out[static_cast<size_t>(t) * (n / 2) + i] = static_cast<float>(acc);
    }
  }
  for (int t = 0; t < 128; ++t) std::memcpy(op.d[t], &out[static_cast<size_t>(t) * (n / 2)], sizeof(float) * (n / 2));
}

// Executes the ops of warpgroup wg, in issue order, up to op `upto` (exclusive)
// as far as all 128 threads issued them; true if all of them are done.
bool advance(int wg, uint64_t upto) {
  Warpgroup& g = state().wgs[wg];
  while (g.executed < upto && !g.ops.empty() && g.ops.front().issued == 128) {
    execute(wg, g.executed, g.ops.front());
    g.ops.pop_front();
    ++g.executed;
  }
  return g.executed >= upto;
}

int warpgroup_of_caller(const char* what) {
  const int rank = simt::thread_rank();
  const int wg = rank / 128;
  if (simt::num_threads() < 128 * (wg + 1)) {
    throw Error(simt::where() + ": " + what + " in a partial warpgroup (the CTA has " +
                std::to_string(simt::num_threads()) + " threads)");
  }
  return wg;
}

// ---------------------------------------------------------------------------
// Named barriers (bar.sync / bar.arrive).

void named_bar(int id, int nthreads, bool wait) {
  const char* op = wait ? "bar.sync" : "bar.arrive";
  if (id < 0 || id > 15) throw Error(simt::where() + ": " + op + " with barrier id " + std::to_string(id) + " (0..15)");
  if (nthreads <= 0 || nthreads % 32 != 0 || nthreads > simt::num_threads()) {
    throw Error(simt::where() + ": " + op + " " + std::to_string(id) + " with thread count " +
                std::to_string(nthreads) + " (a positive multiple of 32, at most the CTA's " +
                std::to_string(simt::num_threads()) + ")");
  }
  NamedBar& b = state().named[id];
  if (b.arrived > 0 && b.expected != nthreads) {
    throw Error(simt::where() + ": " + op + " " + std::to_string(id) + " expects " + std::to_string(nthreads) +
                " threads while " + std::to_string(b.arrived) + " threads arrived expecting " +
                std::to_string(b.expected));
  }
  b.expected = nthreads;
  const uint64_t gen = b.gen;
  race::release(b.acc);
  if (++b.arrived == nthreads) {
    b.arrived = 0;
    b.done[gen & 1] = std::move(b.acc);
    b.acc.clear();
    ++b.gen;
    if (wait) race::acquire(b.done[gen & 1]);
    return;
  }
  if (!wait) return;
  simt::block_until([&b, gen] { return b.gen != gen; },
                    [&b, id] {
                      return "named barrier " + std::to_string(id) + " (" + std::to_string(b.arrived) + " of " +
                             std::to_string(b.expected) + " threads arrived)";
                    });
  race::acquire(b.done[gen & 1]);
}

}  // namespace

// ---------------------------------------------------------------------------
// The API.

void mbar_init(uint32_t bar, uint32_t count) {
  if (bar % 8 != 0 || bar + size_t(8) > simt::dynamic_smem_bytes()) {
    throw Error(simt::where() + ": mbarrier.init on smem " + hex(bar) +
                ", which is not an 8-byte aligned object inside the " + std::to_string(simt::dynamic_smem_bytes()) +
                " bytes of dynamic shared memory");
  }
  if (count < 1 || count > kMbarMax) {
    throw Error(simt::where() + ": mbarrier.init with count " + std::to_string(count) + " (1..2^20-1)");
  }
  Mbar& m = state().bars[bar];  // 9.7.13.15.9 mbarrier.init: phase 0, pending = expected = count, tx-count 0
  m = Mbar{count, count, 0, 0};
  state().in_flight.erase(bar);
}

void mbar_arrive(uint32_t bar) { arrive(bar, 0, "mbarrier.arrive"); }
void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { arrive(bar, bytes, "mbarrier.arrive.expect_tx"); }

// mbarrier.try_wait.parity (9.7.13.15.16): true once the phase with parity
// `parity` has completed, i.e. while the current phase parity differs from it.
void mbar_wait(uint32_t bar, uint32_t parity) {
  const Mbar& m = mbar(bar, "mbarrier.try_wait.parity");
  const uint32_t p = parity & 1u;
  auto ready = [bar, p] {
    const Mbar& mm = mbar(bar, "mbarrier.try_wait.parity");
    if ((mm.phase & 1u) != p) return true;
    land(bar);  // a thread waits: the latest moment for the copies of this barrier
    return (mm.phase & 1u) != p;
  };
  if ((m.phase & 1u) == p) {
    simt::block_until(ready, [bar, p] {
      const State& s = state();
      return "mbarrier.try_wait.parity " + std::to_string(p) + " on " + describe(bar, s.bars.at(bar));
    });
  }
  race::acquire(mbar(bar, "mbarrier.try_wait.parity").done[p]);  // the completed phase of parity p
}

void tma_load_4d(uint32_t dst, const TmaDesc* d, uint32_t bar, int c0, int c1, int c2, int c3) {
  if (d == nullptr || d->rank != 4 || d->base == nullptr) {
    throw Error(simt::where() + ": cp.async.bulk.tensor.4d with a tensor map that make_tma_desc_4d did not fill");
  }
  mbar(bar, "cp.async.bulk.tensor (its mbarrier)");  // an initialised mbarrier, checked at issue
  const int swb = swizzle_bytes(d->swizzle);
  // 5.5.7: the swizzle is a function of the shared address, so the box must
  // start at the pattern's repeat (256 / 512 / 1024 bytes); TMA itself needs
  // 128-byte aligned destinations.
  const uint32_t align = swb == 0 ? 128u : swb * 8u;
  uint64_t bytes = static_cast<uint64_t>(d->elem_bytes);
  for (int k = 0; k < 4; ++k) bytes *= d->box[k];
  if (dst % align != 0 || dst + bytes > simt::dynamic_smem_bytes()) {
    throw Error(simt::where() + ": cp.async.bulk.tensor of " + std::to_string(bytes) + " bytes to smem " + hex(dst) +
                " (dynamic shared memory: " + std::to_string(simt::dynamic_smem_bytes()) +
                " bytes; the destination must be aligned to " + std::to_string(align) + " bytes for " +
                (swb ? std::to_string(swb) + "B swizzle" : std::string("no swizzle")) + ")");
  }
  TmaCopy c{dst, *d, {c0, c1, c2, c3}, static_cast<uint32_t>(bytes), {}, {}};
  race::check(dst, bytes, true, "a TMA load");
  const int eb = d->elem_bytes;
  for_box_rows(*d, c.c, [&](uint64_t, const unsigned char* row, int64_t lo, int64_t hi) {
    if (row != nullptr && hi > lo) {
      race::global(row + lo * eb, static_cast<size_t>((hi - lo) * eb), false, false, "a TMA load");
    }
  });
  c.by = race::now();
  race::snapshot(c.clock);
  if (simt::early_async()) {
    land_copy(bar, c, false);
  } else {
    race::in_flight(dst, bytes, true, 1);
    state().in_flight[bar].push_back(std::move(c));
  }
}

// cp.reduce.async.bulk.tensor .add (PTX ISA, cp.reduce.async.bulk.tensor; 5.5.3 tiled mode): each
// element of the box inside the tensor is added to global memory atomically (fp32 maps);
// elements outside are skipped. Shared memory is read when the copy is
// performed: at the bulk wait_group that covers it (late, the latest moment)
// or at issue (early).
void perform_reduce(const TmaReduce& r) {
  if (r.desc.elem_bytes != 4) {
    throw Error(simt::where() + ": cp.reduce.async.bulk.tensor .add emulated for fp32 maps only");
  }
  const unsigned char* smem = async_smem();
  for_box_rows(r.desc, r.c, [&](uint64_t off, const unsigned char* row, int64_t lo, int64_t hi) {
    if (row == nullptr || hi <= lo) return;
    auto* g = const_cast<unsigned char*>(row) + lo * 4;
    if (!simt::global_read_ok(g, static_cast<size_t>((hi - lo) * 4))) {
      throw Error(simt::where() + ": TMA reduce writes global memory outside every tensor of the launch");
    }
    race::global(g, static_cast<size_t>((hi - lo) * 4), true, true, "a TMA reduce");
    for (int64_t i0 = lo; i0 < hi; ++i0, g += 4) {
      float b;
      std::memcpy(&b, smem + swizzle_addr(r.src + static_cast<uint32_t>(off + i0 * 4), r.desc.swizzle), 4);
      atomicAdd(reinterpret_cast<float*>(g), b);  // other CTAs add to the same rows from other OS threads
    }
  });
}

// Performs a reduce (racecheck: its source read by the calling thread, the issuer, now).
void reduce_now(const TmaReduce& r, bool was_in_flight) {
  perform_reduce(r);
  if (was_in_flight) race::in_flight(r.src, r.bytes, false, -1);
  race::record(r.src, r.bytes, false, race::now(), "a TMA reduce source");
}

void tma_reduce_add_4d(const TmaDesc* d, uint32_t src, int c0, int c1, int c2, int c3) {
  if (d == nullptr || d->rank != 4 || d->base == nullptr) {
    throw Error(simt::where() + ": cp.reduce.async.bulk.tensor with a tensor map that make_tma_desc_4d did not fill");
  }
  const int swb = swizzle_bytes(d->swizzle);
  const uint32_t align = swb == 0 ? 128u : swb * 8u;
  uint64_t bytes = static_cast<uint64_t>(d->elem_bytes);
  for (int k = 0; k < 4; ++k) bytes *= d->box[k];
  if (src % align != 0 || src + bytes > simt::dynamic_smem_bytes()) {
    throw Error(simt::where() + ": cp.reduce.async.bulk.tensor of " + std::to_string(bytes) + " bytes from smem " +
                hex(src) + " (out of range, or not aligned to " + std::to_string(align) + " bytes)");
  }
  const TmaReduce r{src, *d, {c0, c1, c2, c3}, static_cast<uint32_t>(bytes)};
  race::check(src, bytes, false, "a TMA reduce source");
  if (simt::early_async()) {
    reduce_now(r, false);
  } else {
    race::in_flight(src, bytes, false, 1);
    state().threads[simt::thread_rank()].bulk_open.push_back(r);
  }
}

// fence.proxy.async: the generic proxy's shared-memory writes so far become
// visible to the async proxy (at its next read: see async_smem).
void fence_proxy_async() { state().fence_pending = true; }

void bulk_commit() {
  ThreadWg& t = state().threads[simt::thread_rank()];
  t.bulk_groups.push_back(std::move(t.bulk_open));
  t.bulk_open.clear();
}

void bulk_wait_groups(int n) {
  ThreadWg& t = state().threads[simt::thread_rank()];
  while (static_cast<int>(t.bulk_groups.size()) > n) {
    for (const TmaReduce& r : t.bulk_groups.front()) reduce_now(r, true);
    t.bulk_groups.pop_front();
  }
}

void wgmma_fence() { state().threads[simt::thread_rank()].fenced = true; }

void wgmma_commit() {
  ThreadWg& t = state().threads[simt::thread_rank()];
  t.groups.push_back(t.issued);
}

// wgmma.wait_group N: waits until at most N of the thread's most recent
// groups are pending and every earlier group has completed.
void wgmma_wait_groups(int n) {
  const int wg = warpgroup_of_caller("wgmma.wait_group");
  ThreadWg& t = state().threads[simt::thread_rank()];
  if (static_cast<int>(t.groups.size()) <= n) return;
  const uint64_t upto = t.groups[t.groups.size() - 1 - n];
  simt::block_until([wg, upto] { return advance(wg, upto); },
                    [wg, upto] {
                      const Warpgroup& g = state().wgs[wg];
                      const uint64_t next = g.executed;
                      const int issued = g.ops.empty() ? 0 : g.ops.front().issued;
                      return "wgmma.wait_group for op #" + std::to_string(upto - 1) + " of warpgroup " +
                             std::to_string(wg) + " (op #" + std::to_string(next) + " issued by " +
                             std::to_string(issued) + " of its 128 threads)";
                    });
  while (static_cast<int>(t.groups.size()) > n) t.groups.pop_front();
  t.waited = std::max(t.waited, upto);
  if (race::on()) {  // the ops it waited for are complete: so are their reads (only theirs)
    const std::vector<race::Epoch>& exec = state().wgs[wg].exec;
    for (uint64_t i = t.acquired; i < upto && i < exec.size(); ++i) race::acquire_epoch(exec[i]);
    t.acquired = std::max(t.acquired, upto);
  }
}

void wgmma_issue(int n, int kind, int trans_a, int trans_b, const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                 int scale_d, float* d) {
  const int wg = warpgroup_of_caller("wgmma.mma_async");
  State& s = state();
  const int rank = simt::thread_rank();
  ThreadWg& t = s.threads[rank];
  if (!t.fenced) {
    // 9.7.15.6 wgmma.fence: required before the first wgmma.mma_async
    throw Error(simt::where() + ": wgmma.mma_async before any wgmma.fence of this thread");
  }
  Warpgroup& g = s.wgs[wg];
  const uint64_t num = t.issued++;
  const size_t idx = static_cast<size_t>(num - g.executed);
  if (idx == g.ops.size()) {
    g.ops.emplace_back();
    WgOp& op = g.ops.back();
    op.n = n;
    op.kind = kind;
    op.ta = trans_a;
    op.tb = trans_b;
    op.a_regs = a != nullptr;
    op.da = desc_a;
    op.db = desc_b;
    op.scale_d = scale_d != 0;
  } else {
    const WgOp& op = g.ops[idx];
    std::string diff;
    if (op.n != n || op.kind != kind || op.ta != trans_a || op.tb != trans_b || op.a_regs != (a != nullptr)) {
      diff = "shape / types / operand kinds";
    } else if (op.da != desc_a) {
      diff = "A descriptor " + hex(desc_a) + " vs " + hex(op.da);
    } else if (op.db != desc_b) {
      diff = "B descriptor " + hex(desc_b) + " vs " + hex(op.db);
    } else if (op.scale_d != (scale_d != 0)) {
      diff = "scale-d";
    }
    if (!diff.empty()) {
      throw Error(simt::where() + ": wgmma.mma_async op #" + std::to_string(num) + " of warpgroup " +
                  std::to_string(wg) + " is not warpgroup-uniform: " + diff + " differ from what other threads issued");
    }
  }
  WgOp& op = g.ops[idx];
  const int lt = rank - 128 * wg;
  op.d[lt] = d;
  if (a != nullptr) std::memcpy(op.a[lt], a, sizeof(op.a[lt]));
  ++op.issued;
  if (race::on()) {
    // its operands must be written before the issue (checked for one thread of each warp); they are in flight
    // from the issue of the warpgroup's last thread until the op executes
    if (lt % 32 == 0) for_operand_elems(op, [](uint32_t e, const char* what) { race::check(e, 2, false, what); });
    if (op.issued == 128) for_operand_elems(op, [](uint32_t e, const char*) { race::in_flight(e, 2, false, 1); });
  }
  if (simt::early_async() && op.issued == 128) advance(wg, num + 1);
}

void named_barrier_sync(int id, int nthreads) { named_bar(id, nthreads, true); }
void named_barrier_arrive(int id, int nthreads) { named_bar(id, nthreads, false); }

// ---------------------------------------------------------------------------
// The emulated tensor map: cuTensorMapEncodeTiled's checks (CUDA driver API),
// then the fields sm90_emu reads.
const char* make_tma_desc_4d(TmaDesc* out, const void* base, const uint64_t dims[4], const uint64_t strides_bytes[3],
                             const uint32_t box[4], int swizzle, int elem_bytes) {
  if (const char* err = check_tma_desc_4d(base, dims, strides_bytes, box, swizzle, elem_bytes)) return err;
  const int kElem = elem_bytes;
  *out = TmaDesc{};
  out->base = base;
  out->elem_bytes = kElem;
  out->rank = 4;
  for (int i = 0; i < 4; ++i) {
    out->dims[i] = dims[i];
    out->box[i] = box[i];
  }
  out->strides[0] = kElem;
  for (int i = 0; i < 3; ++i) out->strides[i + 1] = strides_bytes[i];
  out->swizzle = swizzle;
  return nullptr;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace attention_ext
