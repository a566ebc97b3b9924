// Racecheck on the SIMT emulator (see racecheck.h): vector clocks, the shadow
// of each CTA's dynamic shared memory, and the access hooks that GCC's
// -fsanitize=thread instrumentation calls in the emulated kernels.
//
// setup.py compiles this file without the instrumentation; AE_NO_TSAN on
// every function keeps it correct with it too (a hook must not call a hook,
// and all of them inline into one another). The hooks return after one load
// of a global while no CTA is checked.
#include "racecheck.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "simt.h"

#define AE_NO_TSAN __attribute__((no_sanitize("thread")))

namespace attention_ext {
namespace simt {
namespace race {
namespace {

// setup.py defines it where it compiles the kernels with -fsanitize=thread (this file is compiled without)
#ifdef ATTENTION_EXT_EMU_ACCESS_HOOKS
constexpr bool kInstrumented = true;
#else
constexpr bool kInstrumented = false;
#endif

// One byte of shared memory (bool masks are staged a byte per thread): its
// last write, and the reads since (none, one epoch, or a vector of every
// thread's last read).
struct Cell {
  uint32_t wclk;
  int32_t wtid;  // -1: never written
  uint32_t rclk;
  int32_t r;  // -1: no read; >= 0: one read (r, rclk); <= -2: read vector -(r + 2)
  const char* wwhat;
  const char* rwhat;
  uint16_t infl_w, infl_r;  // asynchronous writes / reads in flight
};

// The hot paths index raw pointers: the std::vector members of a function
// without instrumentation would not be inlined (the attributes differ), and
// their out-of-line copies are instrumented.
struct State {
  int n = 0;
  unsigned char* base = nullptr;
  size_t bytes = 0;
  std::vector<uint32_t> vc_;  // n x n: row t is thread t's clock
  std::vector<Cell> cells_;
  std::vector<uint32_t> pool_;  // read vectors, n entries each
  uint32_t* vc = nullptr;
  Cell* cells = nullptr;
  uint32_t* pool = nullptr;
  std::vector<int32_t> free_vecs;
  int32_t vecs = 0;
  int cur = -1;
  int64_t cta = -1;  // the CTA's linear index in the grid
  bool failed = false;
  std::string failure;
};

// The shared memory of the CTAs being checked (one slot per OS thread that
// runs one), for the hooks' first test without thread-local storage: most
// instrumented accesses are to registers spilled to the stack or to global
// memory.
constexpr int kSlots = 256;
std::atomic<int> g_active{0};     // CTAs being checked, in any OS thread
std::atomic<int> g_slots_used{0};  // slots [0, g_slots_used) may be in use
std::atomic<uintptr_t> g_lo[kSlots], g_hi[kSlots];
thread_local State* t_state = nullptr;
thread_local State* t_spare = nullptr;  // the last CTA's state, reused (its arrays stay mapped)
thread_local int t_slot = -1;

// No CTA is checked in any OS thread: the entry points below return at once,
// without touching thread-local storage (most launches).
AE_NO_TSAN inline bool idle() { return g_active.load(std::memory_order_relaxed) == 0; }

AE_NO_TSAN inline State* live() {
  if (idle()) return nullptr;
  State* s = t_state;
  if (s == nullptr || s->cur < 0 || s->failed) return nullptr;
  return s;
}

AE_NO_TSAN std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof(b), "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

AE_NO_TSAN std::string thread_name(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", warpgroup " + std::to_string(t / 128) +
         ")";
}

AE_NO_TSAN void fail(State& s, size_t word, int t, const char* what, bool write, const std::string& against) {
  if (s.failed) return;
  s.failed = true;
  s.failure = "racecheck: " + simt::where() + ": " + thread_name(t) + " " + (write ? "writes" : "reads") +
              " shared memory at byte " + hex(word) + " (" + what + ") " + against;
}

AE_NO_TSAN void fail_hb(State& s, size_t word, int t, const char* what, bool write, int u, const char* uwhat,
                        bool u_wrote) {
  const char* hazard = write ? (u_wrote ? "write-after-write" : "write-after-read") : "read-after-write";
  fail(s, word, t, what, write,
       std::string("while the ") + (u_wrote ? "write" : "read") + " of " + thread_name(u) + " (" +
           (uwhat ? uwhat : "?") + ") is not ordered before it: a " + hazard +
           " race (no barrier, mbarrier wait or asynchronous-operation wait between the two)");
}

AE_NO_TSAN inline uint32_t* read_vec(State& s, int32_t r) { return s.pool + static_cast<size_t>(-(r + 2)) * s.n; }

AE_NO_TSAN inline void drop_reads(State& s, Cell& c) {
  if (c.r <= -2) s.free_vecs.push_back(-(c.r + 2));
  c.r = -1;
}

AE_NO_TSAN inline void check_word(State& s, size_t w, int t, bool write, const char* what) {
  const Cell& c = s.cells[w];
  const uint32_t* my = s.vc + static_cast<size_t>(t) * s.n;
  if (c.infl_w > 0) {
    fail(s, w, t, what, write,
         "while an asynchronous write to it (cp.async / TMA load) is in flight: a race with the copy, which lands "
         "only at its wait (cp.async.wait_group, or the mbarrier wait that sees its complete-tx)");
    return;
  }
  if (write && c.infl_r > 0) {
    fail(s, w, t, what, write,
         "while an asynchronous read of it (a wgmma operand / a TMA reduce source) is in flight: a write-after-read "
         "race with an operation that completes only at its wait (wgmma.wait_group / cp.async.bulk.wait_group)");
    return;
  }
  if (c.wtid >= 0 && c.wtid != t && c.wclk > my[c.wtid]) {
    fail_hb(s, w, t, what, write, c.wtid, c.wwhat, true);
    return;
  }
  if (!write) return;
  if (c.r >= 0) {
    if (c.r != t && c.rclk > my[c.r]) fail_hb(s, w, t, what, write, c.r, c.rwhat, false);
  } else if (c.r <= -2) {
    const uint32_t* v = read_vec(s, c.r);
    for (int u = 0; u < s.n; ++u) {
      if (u != t && v[u] > my[u]) {
        fail_hb(s, w, t, what, write, u, c.rwhat, false);
        return;
      }
    }
  }
}

AE_NO_TSAN inline void record_word(State& s, size_t w, bool write, int t, uint32_t clk, const char* what) {
  Cell& c = s.cells[w];
  if (write) {
    drop_reads(s, c);
    c.wtid = t;
    c.wclk = clk;
    c.wwhat = what;
    return;
  }
  c.rwhat = what;
  if (c.r == -1) {
    c.r = t;
    c.rclk = clk;
  } else if (c.r >= 0) {
    const uint32_t* my = s.vc + static_cast<size_t>(t) * s.n;
    if (c.r == t || c.rclk <= my[c.r]) {  // the earlier read is ordered before this one: it is enough
      c.r = t;
      c.rclk = clk;
      return;
    }
    int32_t k;
    if (!s.free_vecs.empty()) {
      k = s.free_vecs.back();
      s.free_vecs.pop_back();
    } else {
      k = s.vecs++;
      s.pool_.resize(static_cast<size_t>(s.vecs) * s.n);
      s.pool = s.pool_.data();
    }
    uint32_t* v = s.pool + static_cast<size_t>(k) * s.n;
    std::fill(v, v + s.n, 0u);
    v[c.r] = c.rclk;
    v[t] = std::max(v[t], clk);
    c.r = -(k + 2);
  } else {
    uint32_t* v = read_vec(s, c.r);
    v[t] = std::max(v[t], clk);
  }
}

// The bytes of [off, off + bytes) that lie in shared memory.
AE_NO_TSAN inline bool words(const State& s, uint32_t off, size_t bytes, size_t& w0, size_t& w1) {
  if (bytes == 0 || off >= s.bytes) return false;
  w0 = off;
  w1 = std::min<size_t>(static_cast<size_t>(off) + bytes, s.bytes);
  return true;
}

// ---- global memory: one shadow per launch, shared by the OS threads that run its CTAs (under a mutex) ----

// One byte of a registered tensor: its last write and last plain read, each with its CTA and its thread's
// epoch; reads from more than one CTA since the last write are only counted.
struct GCell {
  int64_t w_cta = -1;  // -1: not written in this launch
  int32_t w_tid = -1;
  uint32_t w_clk = 0;
  bool w_atomic = false;
  bool r_multi = false;  // plain reads by two CTAs or more since the last write
  int64_t r_cta = -1;    // -1: no plain read since the last write
  int32_t r_tid = -1;
  uint32_t r_clk = 0;
  const char* w_what = nullptr;
  const char* r_what = nullptr;
};

std::atomic<bool> g_global{false};
std::mutex g_gmu;
std::vector<std::pair<uintptr_t, uintptr_t>> g_gregions;  // [lo, hi), fixed for the launch
std::unordered_map<uintptr_t, GCell> g_gcells;

AE_NO_TSAN bool in_global(uintptr_t a) {
  for (const auto& r : g_gregions)
    if (a >= r.first && a < r.second) return true;
  return false;
}

AE_NO_TSAN std::string cta_name(int64_t c) { return "CTA " + std::to_string(c); }

AE_NO_TSAN void fail_global(State& s, uintptr_t a, int t, const char* what, bool write, const std::string& against) {
  if (s.failed) return;
  s.failed = true;
  s.failure = "racecheck: " + simt::where() + ": " + thread_name(t) + " of " + cta_name(s.cta) + " " +
              (write ? "writes" : "reads") + " global memory at " + hex(a) + " (" + what + ") " + against;
}

// Checks, then records, one access of the current thread to global bytes [a, a + bytes) of a registered tensor.
AE_NO_TSAN void global_access(uintptr_t a, size_t bytes, bool write, bool atomic, const char* what) {
  State* s = live();
  if (s == nullptr) return;
  const int t = s->cur;
  const uint32_t* my = s->vc + static_cast<size_t>(t) * s->n;
  const uint32_t clk = my[t];
  std::lock_guard<std::mutex> lock(g_gmu);
  for (size_t i = 0; i < bytes && !s->failed; ++i) {
    GCell& c = g_gcells[a + i];
    if (c.w_cta >= 0 && !(atomic && c.w_atomic)) {
      const char* hazard = write ? "write-after-write" : "read-after-write";
      if (c.w_cta != s->cta) {
        fail_global(*s, a + i, t, what, write,
                    std::string("that ") + cta_name(c.w_cta) + " wrote (" + (c.w_what ? c.w_what : "?") +
                        ") in the same launch: a " + hazard +
                        " race between CTAs (nothing orders the CTAs of a launch; only atomics may share a byte)");
      } else if (c.w_tid != t && c.w_clk > my[c.w_tid]) {
        fail_global(*s, a + i, t, what, write,
                    "while the write of " + thread_name(c.w_tid) + " (" + (c.w_what ? c.w_what : "?") +
                        ") is not ordered before it: a " + hazard + " race (no barrier or mbarrier wait between)");
      }
    }
    if (s->failed) break;
    if (write) {
      if (c.r_multi || (c.r_cta >= 0 && c.r_cta != s->cta)) {
        const std::string readers = c.r_multi ? std::string("other CTAs") : cta_name(c.r_cta);
        fail_global(*s, a + i, t, what, write,
                    "that " + readers + " read (" + (c.r_what ? c.r_what : "?") +
                        ") in the same launch: a write-after-read race between CTAs");
      } else if (c.r_cta == s->cta && c.r_tid != t && c.r_clk > my[c.r_tid]) {
        fail_global(*s, a + i, t, what, write,
                    "while the read of " + thread_name(c.r_tid) + " (" + (c.r_what ? c.r_what : "?") +
                        ") is not ordered before it: a write-after-read race (no barrier or mbarrier wait between)");
      }
      if (s->failed) break;
      c.w_cta = s->cta;
      c.w_tid = t;
      c.w_clk = clk;
      c.w_atomic = atomic;
      c.w_what = what;
      c.r_cta = -1;
      c.r_multi = false;
    } else if (!atomic) {
      if (c.r_cta >= 0 && c.r_cta != s->cta) c.r_multi = true;
      c.r_cta = s->cta;
      c.r_tid = t;
      c.r_clk = clk;
      c.r_what = what;
    }
  }
}

AE_NO_TSAN __attribute__((noinline)) void hook_global(const void* p, size_t bytes, bool write, bool atomic) {
  const char* what = atomic ? (write ? "an atomic update" : "an atomic load") : (write ? "a store" : "a load");
  global(p, bytes, write, atomic, what);
}

AE_NO_TSAN __attribute__((noinline)) void hook_slow(const void* p, size_t bytes, bool write) {
  State* s = live();
  if (s == nullptr) return;
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(s->base);
  if (off >= s->bytes) return;
  const char* what = write ? "a store" : "a load";
  size_t w0, w1;
  if (!words(*s, static_cast<uint32_t>(off), bytes, w0, w1)) return;
  const int t = s->cur;
  const uint32_t clk = s->vc[static_cast<size_t>(t) * s->n + t];
  for (size_t w = w0; w < w1; ++w) {
    check_word(*s, w, t, write, what);
    record_word(*s, w, write, t, clk, what);
  }
}

// The hooks' fast path: one load while no CTA is checked, then a look at the
// shared memory of each CTA being checked.
AE_NO_TSAN inline __attribute__((always_inline)) void hook(const void* p, size_t bytes, bool write) {
  if (__builtin_expect(g_active.load(std::memory_order_relaxed) == 0, 1)) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int n = g_slots_used.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i) {
    if (a >= g_lo[i].load(std::memory_order_relaxed) && a < g_hi[i].load(std::memory_order_relaxed)) {
      hook_slow(p, bytes, write);
      return;
    }
  }
  if (g_global.load(std::memory_order_relaxed)) hook_global(p, bytes, write, false);
}

// An atomic access (the instrumentation's atomic entry points) of the kernels to global memory.
AE_NO_TSAN inline __attribute__((always_inline)) void hook_atomic(const volatile void* p, size_t bytes, bool write) {
  if (__builtin_expect(!g_global.load(std::memory_order_relaxed), 1)) return;
  hook_global(const_cast<const void*>(p), bytes, write, true);
}

}  // namespace

AE_NO_TSAN bool wanted() {
  const char* e = std::getenv("ATTENTION_EXT_EMU_RACECHECK");
  if (e == nullptr || *e == 0 || std::strcmp(e, "0") == 0) return false;
  if (std::strcmp(e, "1") != 0) {
    throw Error(std::string("ATTENTION_EXT_EMU_RACECHECK must be 0 or 1, got '") + e + "'");
  }
  if (!kInstrumented) {
    throw Error(
        "ATTENTION_EXT_EMU_RACECHECK=1: this build of attention_ext._C_emu has no access instrumentation "
        "(it is compiled with -fsanitize=thread by setup.py; another compiler or flags left it out)");
  }
  return true;
}

AE_NO_TSAN void begin_launch(const std::vector<std::pair<const unsigned char*, size_t>>& regions) {
  std::lock_guard<std::mutex> lock(g_gmu);
  g_gregions.clear();
  for (const auto& r : regions) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(r.first);
    g_gregions.emplace_back(lo, lo + r.second);
  }
  g_gcells.clear();
  g_global.store(!g_gregions.empty());
}

AE_NO_TSAN void global(const void* p, size_t bytes, bool write, bool atomic, const char* what) {
  if (!g_global.load(std::memory_order_relaxed) || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (in_global(a)) global_access(a, bytes, write, atomic, what);
}

AE_NO_TSAN void end_launch() {
  std::lock_guard<std::mutex> lock(g_gmu);
  g_global.store(false);
  g_gregions.clear();
  g_gcells.clear();
}

AE_NO_TSAN void begin_cta(int threads, unsigned char* smem, size_t bytes, int64_t cta) {
  State* s = t_spare != nullptr ? t_spare : new State;
  t_spare = nullptr;
  s->n = threads;
  s->base = smem;
  s->bytes = bytes;
  s->vc_.assign(static_cast<size_t>(threads) * threads, 0u);
  s->vc = s->vc_.data();
  for (int t = 0; t < threads; ++t) s->vc[static_cast<size_t>(t) * threads + t] = 1;
  s->cells_.assign(bytes, Cell{0, -1, 0, -1, nullptr, nullptr, 0, 0});
  s->cells = s->cells_.data();
  s->pool_.clear();  // its capacity is kept
  s->pool = s->pool_.data();
  s->vecs = 0;
  s->free_vecs.clear();
  s->cur = -1;
  s->cta = cta;
  s->failed = false;
  s->failure.clear();
  t_state = s;
  if (t_slot < 0) {  // this OS thread's slot: the first free one
    for (int i = 0; i < kSlots && t_slot < 0; ++i) {
      uintptr_t none = 0;
      if (g_lo[i].compare_exchange_strong(none, 1)) t_slot = i;
    }
    if (t_slot < 0) throw Error("racecheck: more than 256 OS threads run checked CTAs");
    int used = g_slots_used.load();
    while (used < t_slot + 1 && !g_slots_used.compare_exchange_weak(used, t_slot + 1)) {
    }
  }
  g_hi[t_slot].store(0);
  g_lo[t_slot].store(reinterpret_cast<uintptr_t>(smem));
  g_hi[t_slot].store(reinterpret_cast<uintptr_t>(smem) + bytes);
  g_active.fetch_add(1);
}

AE_NO_TSAN void end_cta() {
  if (t_state == nullptr) return;
  g_hi[t_slot].store(0);  // the slot stays this thread's (lo != 0), empty
  delete t_spare;
  t_spare = t_state;
  t_state = nullptr;
  g_active.fetch_sub(1);
}

AE_NO_TSAN bool on() { return !idle() && t_state != nullptr; }
AE_NO_TSAN void set_current(int rank) {
  if (!idle() && t_state != nullptr) t_state->cur = rank;
}
AE_NO_TSAN const char* failure() { return !idle() && t_state != nullptr ? t_state->failure.c_str() : ""; }

AE_NO_TSAN void release(Clock& into) {
  if (idle()) return;
  State* s = t_state;
  if (s == nullptr || s->cur < 0) return;
  into.resize(static_cast<size_t>(s->n), 0u);
  uint32_t* my = s->vc + static_cast<size_t>(s->cur) * s->n;
  uint32_t* in = into.data();
  for (int i = 0; i < s->n; ++i) in[i] = std::max(in[i], my[i]);
  ++my[s->cur];
}

AE_NO_TSAN void acquire(const Clock& from) {
  if (idle()) return;
  State* s = t_state;
  if (s == nullptr || s->cur < 0 || from.empty()) return;
  uint32_t* my = s->vc + static_cast<size_t>(s->cur) * s->n;
  const uint32_t* f = from.data();
  for (int i = 0; i < s->n; ++i) my[i] = std::max(my[i], f[i]);
}

AE_NO_TSAN void join(Clock& into, const Clock& from) {
  if (from.empty()) return;
  const size_t n = from.size();
  into.resize(n, 0u);
  uint32_t* in = into.data();
  const uint32_t* f = from.data();
  for (size_t i = 0; i < n; ++i) in[i] = std::max(in[i], f[i]);
}

AE_NO_TSAN Epoch now() {
  if (idle()) return {};
  State* s = t_state;
  if (s == nullptr || s->cur < 0) return {};
  return {s->cur, s->vc[static_cast<size_t>(s->cur) * s->n + s->cur]};
}

AE_NO_TSAN void snapshot(Clock& out) {
  if (idle()) return;
  State* s = t_state;
  if (s == nullptr || s->cur < 0) return;
  const uint32_t* my = s->vc + static_cast<size_t>(s->cur) * s->n;
  out.assign(my, my + s->n);
}

AE_NO_TSAN void add_epoch(Clock& into, const Epoch& e) {
  if (idle()) return;
  State* s = t_state;
  if (s == nullptr || e.rank < 0) return;
  into.resize(static_cast<size_t>(s->n), 0u);
  into[e.rank] = std::max(into[e.rank], e.clock);
}

AE_NO_TSAN void acquire_epoch(const Epoch& e) {
  if (idle()) return;
  State* s = t_state;
  if (s == nullptr || s->cur < 0 || e.rank < 0) return;
  uint32_t& c = s->vc[static_cast<size_t>(s->cur) * s->n + e.rank];
  c = std::max(c, e.clock);
}

AE_NO_TSAN void check(uint32_t off, size_t bytes, bool write, const char* what) {
  if (idle()) return;
  State* s = t_state;
  size_t w0, w1;
  if (s == nullptr || s->cur < 0 || s->failed || !words(*s, off, bytes, w0, w1)) return;
  for (size_t w = w0; w < w1 && !s->failed; ++w) check_word(*s, w, s->cur, write, what);
}

AE_NO_TSAN void record(uint32_t off, size_t bytes, bool write, const Epoch& e, const char* what) {
  if (idle()) return;
  State* s = t_state;
  size_t w0, w1;
  if (s == nullptr || e.rank < 0 || !words(*s, off, bytes, w0, w1)) return;
  for (size_t w = w0; w < w1; ++w) record_word(*s, w, write, e.rank, e.clock, what);
}

AE_NO_TSAN void access(uint32_t off, size_t bytes, bool write, const char* what) {
  check(off, bytes, write, what);
  record(off, bytes, write, now(), what);
}

AE_NO_TSAN void in_flight(uint32_t off, size_t bytes, bool write, int delta) {
  if (idle()) return;
  State* s = t_state;
  size_t w0, w1;
  if (s == nullptr || !words(*s, off, bytes, w0, w1)) return;
  for (size_t w = w0; w < w1; ++w) {
    uint16_t& f = write ? s->cells[w].infl_w : s->cells[w].infl_r;
    f = static_cast<uint16_t>(f + delta);
  }
}

}  // namespace race
}  // namespace simt
}  // namespace attention_ext

// ---------------------------------------------------------------------------
// The entry points of GCC's -fsanitize=thread instrumentation (the ABI of
// compiler-rt's tsan_interface.h / tsan_interface_atomic.h), defined here
// instead of by a TSan runtime: plain accesses go to the shared-memory check,
// atomics are performed (sequentially consistent), the rest are no-ops.
// Hidden: they never leave this library.
#define AE_HOOK extern "C" __attribute__((visibility("hidden"), no_sanitize("thread"), used))

namespace {
using attention_ext::simt::race::hook;         // NOLINT
using attention_ext::simt::race::hook_atomic;  // NOLINT
}

#define AE_RW_HOOKS(N)                                                                  \
  AE_HOOK void __tsan_read##N(void* p) { hook(p, N, false); }                           \
  AE_HOOK void __tsan_write##N(void* p) { hook(p, N, true); }                           \
  AE_HOOK void __tsan_unaligned_read##N(void* p) { hook(p, N, false); }                 \
  AE_HOOK void __tsan_unaligned_write##N(void* p) { hook(p, N, true); }                 \
  AE_HOOK void __tsan_volatile_read##N(void* p) { hook(p, N, false); }                  \
  AE_HOOK void __tsan_volatile_write##N(void* p) { hook(p, N, true); }                  \
  AE_HOOK void __tsan_unaligned_volatile_read##N(void* p) { hook(p, N, false); }        \
  AE_HOOK void __tsan_unaligned_volatile_write##N(void* p) { hook(p, N, true); }
AE_RW_HOOKS(1)
AE_RW_HOOKS(2)
AE_RW_HOOKS(4)
AE_RW_HOOKS(8)
AE_RW_HOOKS(16)
#undef AE_RW_HOOKS

AE_HOOK void __tsan_read_range(void* p, unsigned long n) { hook(p, n, false); }
AE_HOOK void __tsan_write_range(void* p, unsigned long n) { hook(p, n, true); }
AE_HOOK void __tsan_init() {}
AE_HOOK void __tsan_func_entry(void*) {}
AE_HOOK void __tsan_func_exit() {}
AE_HOOK void __tsan_vptr_update(void**, void*) {}
AE_HOOK void __tsan_vptr_read(void**) {}

#define AE_ATOMIC_RMW(N, T, OP)                                  \
  AE_HOOK T __tsan_atomic##N##_##OP(volatile T* a, T v, int) {   \
    hook_atomic(a, sizeof(T), true);                             \
    return __atomic_##OP(a, v, __ATOMIC_SEQ_CST);                \
  }
#define AE_ATOMIC_HOOKS(N, T)                                                                                   \
  AE_HOOK T __tsan_atomic##N##_load(const volatile T* a, int) {                                                 \
    hook_atomic(a, sizeof(T), false);                                                                           \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                             \
  AE_HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                              \
    hook_atomic(a, sizeof(T), true);                                                                            \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                   \
  }                                                                                                             \
  AE_HOOK T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                              \
    hook_atomic(a, sizeof(T), true);                                                                            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                         \
  }                                                                                                             \
  AE_ATOMIC_RMW(N, T, fetch_add)                                                                                \
  AE_ATOMIC_RMW(N, T, fetch_sub)                                                                                \
  AE_ATOMIC_RMW(N, T, fetch_and)                                                                                \
  AE_ATOMIC_RMW(N, T, fetch_or)                                                                                 \
  AE_ATOMIC_RMW(N, T, fetch_xor)                                                                                \
  AE_ATOMIC_RMW(N, T, fetch_nand)                                                                               \
  AE_HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                  \
    hook_atomic(a, sizeof(T), true);                                                                            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
  }                                                                                                             \
  AE_HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                    \
    hook_atomic(a, sizeof(T), true);                                                                            \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
  }                                                                                                             \
  AE_HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                        \
    hook_atomic(a, sizeof(T), true);                                                                            \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                           \
    return c;                                                                                                   \
  }
AE_ATOMIC_HOOKS(8, unsigned char)
AE_ATOMIC_HOOKS(16, unsigned short)
AE_ATOMIC_HOOKS(32, unsigned int)
AE_ATOMIC_HOOKS(64, unsigned long long)
#undef AE_ATOMIC_HOOKS
#undef AE_ATOMIC_RMW

AE_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
AE_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
