// The fiber scheduler behind simt.h: one fiber per CUDA thread, the
// CTAs of a grid dealt out to a few OS threads in block order (each runs its
// CTAs one after another), the fibers of a CTA cooperatively (each runs until
// it waits at a barrier or a warp collective, or ends).
#include "simt.h"

#include "racecheck.h"

#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__x86_64__)
// A fiber switch without swapcontext's signal-mask system call (nearly half the
// emulator's time went to it): the callee-saved registers, the x87 control word
// and MXCSR go onto the old stack, its stack pointer into *save_sp, and the new
// fiber's are restored from next_sp (System V AMD64 ABI).
extern "C" void attention_ext_simt_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl attention_ext_simt_switch
  .hidden attention_ext_simt_switch
  .type attention_ext_simt_switch, @function
attention_ext_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size attention_ext_simt_switch, .-attention_ext_simt_switch
)");
#endif

namespace attention_ext {
namespace simt {
namespace {

// The saved state of a fiber (or of the scheduler).
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `c` to start entry() (which never returns) on the given stack.
void make_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  top[-1] = 0;                                   // entry's return address: none (ends the unwinder's walk)
  top[-2] = reinterpret_cast<uint64_t>(entry);   // where the first switch's ret lands
  for (int r = 3; r <= 8; ++r) top[-r] = 0;      // rbp, rbx, r12 .. r15
  top[-9] = mxcsr;                               // 8(%rsp)
  top[-10] = fpcw;                               // (%rsp)
  c.sp = top - 10;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

// Saves the running context into `from` and resumes `to`.
inline void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
  attention_ext_simt_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
  int src_bytes;
};

enum class Wait { kNone, kBlock, kWarp, kCond };

struct Fiber {
  Context ctx;
  ThreadVars v;
  int lane = 0, warp = 0;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t wait_gen = 0;
  std::function<bool()> ready;                // Wait::kCond
  std::function<std::string()> waits_on;      // Wait::kCond, for deadlock reports
  std::vector<Copy> open;                  // issued, not yet committed
  std::deque<std::vector<Copy>> committed;  // committed groups, oldest first
};

struct WarpState {
  uint32_t in[32 * kSlot];
  uint32_t out[32 * kSlot];
  int arrived = 0;
  uint64_t gen = 0;
  const char* what = nullptr;
  race::Clock acc, done;  // racecheck: the lanes' clocks as they arrive; at the last collective
};

enum class Order { kForward, kReverse, kShuffle };

struct Launch {
  Context main;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Fiber* cur = nullptr;
  const std::function<void()>* kernel = nullptr;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  int bar_or = 0;         // OR of the predicates of the barrier being filled
  int bar_or_result = 0;  // ... of the last completed one
  race::Clock bar_acc, bar_done;  // racecheck: __syncthreads as it fills; the last completed one
  std::exception_ptr error;
  const char* name = "";
  bool early_copies = false;
  bool racecheck = false;
  std::unique_ptr<CtaState> ext[kCtaSlots];  // per-CTA extension state (sm90_emu.cpp)
};

thread_local Launch* g_launch = nullptr;
thread_local std::vector<std::pair<const unsigned char*, size_t>> g_regions;

// Fiber stacks: reused across launches (mmap'd, with a guard page below).
constexpr size_t kStackBytes = size_t(1) << 20;
thread_local std::vector<unsigned char*> g_stacks;

unsigned char* stack_at(size_t i) {
  while (g_stacks.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("simt: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    g_stacks.push_back(static_cast<unsigned char*>(p) + page);
  }
  return g_stacks[i];
}

Launch& launch() {
  if (g_launch == nullptr || g_launch->cur == nullptr) throw Error("simt: CUDA device code called outside a launch");
  return *g_launch;
}

std::string where_of(const Launch& L, const Fiber& f) {
  std::ostringstream os;
  os << L.name << ", block (" << f.v.block_idx.x << "," << f.v.block_idx.y << "," << f.v.block_idx.z << "), thread "
     << f.v.thread_idx.x;
  return os.str();
}

void yield() {
  Launch& L = *g_launch;
  Fiber* f = L.cur;
  switch_context(f->ctx, L.main);
  L.cur = f;
  f->wait = Wait::kNone;
}

void fiber_main() {
  Launch& L = *g_launch;
  try {
    (*L.kernel)();
    const int rank = static_cast<int>(L.cur - L.fibers.data());
    for (auto& e : L.ext)
      if (e) e->thread_exit(rank);
  } catch (...) {
    if (!L.error) L.error = std::current_exception();
  }
  L.cur->done = true;
  switch_context(L.cur->ctx, L.main);  // never resumed: the fiber is done
  std::abort();
}

// Runs a waiting fiber's condition (or description) as if from that fiber, so
// that the extension code it calls sees the fiber as the current thread.
template <typename R>
R as_fiber(Launch& L, const Fiber& f, const std::function<R()>& fn) {
  Fiber* saved = L.cur;
  L.cur = const_cast<Fiber*>(&f);
  race::set_current(static_cast<int>(&f - L.fibers.data()));
  struct Restore {
    Launch& L;
    Fiber* saved;
    ~Restore() {
      L.cur = saved;
      race::set_current(saved != nullptr ? static_cast<int>(saved - L.fibers.data()) : -1);
    }
  } restore{L, saved};
  return fn();
}

bool runnable(Launch& L, const Fiber& f) {
  if (f.done) return false;
  switch (f.wait) {
    case Wait::kNone: return true;
    case Wait::kBlock: return L.bar_gen != f.wait_gen;
    case Wait::kWarp: return L.warps[f.warp].gen != f.wait_gen;
    case Wait::kCond: return as_fiber(L, f, f.ready);
  }
  return false;
}

Order order_from_env() {
  const char* e = std::getenv("ATTENTION_EXT_EMU_ORDER");
  if (e == nullptr || std::string(e) == "forward" || *e == 0) return Order::kForward;
  if (std::string(e) == "reverse") return Order::kReverse;
  if (std::string(e) == "shuffle") return Order::kShuffle;
  throw Error(std::string("ATTENTION_EXT_EMU_ORDER must be forward, reverse or shuffle, got '") + e + "'");
}

bool early_from_env() {
  const char* e = std::getenv("ATTENTION_EXT_EMU_CPASYNC");
  if (e == nullptr || *e == 0 || std::string(e) == "late") return false;
  if (std::string(e) == "early") return true;
  throw Error(std::string("ATTENTION_EXT_EMU_CPASYNC must be early or late, got '") + e + "'");
}

// Lands a cp.async (in its thread's fiber); racecheck: a write at this moment,
// the end of the copy's flight (late) or its issue (early).
void perform(Launch& L, const Copy& c, bool was_in_flight) {
  unsigned char* dst = L.smem.data() + c.dst;
  if (c.src_bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.src_bytes));
  if (c.src_bytes < c.bytes) std::memset(dst + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  if (was_in_flight) race::in_flight(c.dst, static_cast<size_t>(c.bytes), true, -1);
  race::record(c.dst, static_cast<size_t>(c.bytes), true, race::now(), "cp.async");
}

void run_block(Launch& L, dim3 grid, dim3 block, uint3 bidx, Order order, std::mt19937& rng) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  std::fill(L.smem.begin(), L.smem.end(), static_cast<unsigned char>(0xff));  // NaN in every element type
  L.bar_arrived = 0;
  L.bar_or = 0;
  L.bar_acc.clear();
  L.bar_done.clear();
  for (auto& e : L.ext) e.reset();
  for (WarpState& w : L.warps) {
    w.arrived = 0;
    w.what = nullptr;
    w.acc.clear();
    w.done.clear();
  }
  struct RaceCta {  // racecheck's state of this CTA, from here to its end (or fault)
    explicit RaceCta(bool on, int n, Launch& L, int64_t cta) {
      if (on) race::begin_cta(n, L.smem.data(), L.smem_bytes, cta);
    }
    ~RaceCta() { race::end_cta(); }
  } race_cta(L.racecheck, n, L,
             bidx.x + static_cast<int64_t>(grid.x) * (bidx.y + static_cast<int64_t>(grid.y) * bidx.z));
  for (int i = 0; i < n; ++i) {
    Fiber& f = L.fibers[i];
    f.v.thread_idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.v.block_idx = bidx;
    f.v.block_dim = block;
    f.v.grid_dim = grid;
    f.lane = i % 32;
    f.warp = i / 32;
    f.done = false;
    f.wait = Wait::kNone;
    f.ready = nullptr;
    f.waits_on = nullptr;
    f.open.clear();
    f.committed.clear();
    make_context(f.ctx, stack_at(static_cast<size_t>(i)), kStackBytes, &fiber_main);
  }
  std::vector<int> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  if (order == Order::kReverse) std::reverse(idx.begin(), idx.end());
  int live = n;
  while (live > 0) {
    if (order == Order::kShuffle) std::shuffle(idx.begin(), idx.end(), rng);
    bool ran = false;
    for (int i : idx) {
      Fiber& f = L.fibers[i];
      if (!runnable(L, f)) continue;
      ran = true;
      L.cur = &f;
      race::set_current(i);
      switch_context(L.main, f.ctx);
      race::set_current(-1);
      L.cur = nullptr;
      if (L.error) std::rethrow_exception(L.error);
      if (*race::failure() != 0) throw Error(race::failure());
      if (f.done) {
        --live;
        if (L.bar_arrived > 0 && live > 0) {
          throw Error(where_of(L, f) + ": thread exited while " + std::to_string(L.bar_arrived) +
                      " threads wait at __syncthreads (the barrier can never complete)");
        }
      }
    }
    if (!ran && live > 0) {
      // what each live thread waits on, threads with the same wait grouped
      std::vector<std::pair<std::string, std::vector<int>>> waits;
      for (int i = 0; i < n; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.done) continue;
        std::string w;
        switch (f.wait) {
          case Wait::kBlock: w = "__syncthreads"; break;
          case Wait::kWarp: w = L.warps[f.warp].what ? L.warps[f.warp].what : "?"; break;
          case Wait::kCond: w = f.waits_on ? as_fiber(L, f, f.waits_on) : "?"; break;
          case Wait::kNone: w = "nothing"; break;
        }
        auto it = std::find_if(waits.begin(), waits.end(), [&](const auto& p) { return p.first == w; });
        if (it == waits.end()) {
          waits.push_back({w, {i}});
        } else {
          it->second.push_back(i);
        }
      }
      std::ostringstream os;
      os << L.name << ", block (" << bidx.x << "," << bidx.y << "," << bidx.z << "): deadlock; ";
      int shown = 0;
      for (const auto& [w, ids] : waits) {
        if (shown++ >= 8) break;
        // "thread 0 waits at X (so do threads 1-15,32); "
        os << "thread " << ids[0] << " waits at " << w;
        if (ids.size() > 1) {
          os << " (so do thread" << (ids.size() > 2 ? "s " : " ");
          for (size_t a = 1; a < ids.size();) {
            size_t b = a;
            while (b + 1 < ids.size() && ids[b + 1] == ids[b] + 1) ++b;
            os << (a > 1 ? "," : "") << ids[a];
            if (b > a) os << "-" << ids[b];
            a = b + 1;
          }
          os << ")";
        }
        os << "; ";
      }
      os << live << " threads live, " << L.bar_arrived << " at the block barrier";
      throw Error(os.str());
    }
  }
}

}  // namespace

const ThreadVars& vars() { return launch().cur->v; }

int syncthreads_or(int pred) {
  Launch& L = launch();
  Fiber& f = *L.cur;
  const WarpState& mine = L.warps[f.warp];
  if (mine.arrived > 0) {
    throw Error(where_of(L, f) + ": __syncthreads while other lanes of its warp wait in " + std::string(mine.what));
  }
  L.bar_or |= pred != 0;
  race::release(L.bar_acc);
  if (++L.bar_arrived == static_cast<int>(L.fibers.size())) {
    L.bar_arrived = 0;
    L.bar_or_result = L.bar_or;
    L.bar_or = 0;
    L.bar_done = std::move(L.bar_acc);
    L.bar_acc.clear();
    race::acquire(L.bar_done);
    ++L.bar_gen;
    return L.bar_or_result;
  }
  f.wait = Wait::kBlock;
  f.wait_gen = L.bar_gen;
  yield();
  // every thread reads the result (and the barrier's clock) before it can arrive at the next barrier
  race::acquire(L.bar_done);
  return L.bar_or_result;
}

void syncthreads() { syncthreads_or(0); }

unsigned char* dynamic_smem() { return launch().smem.data(); }
size_t dynamic_smem_bytes() { return launch().smem_bytes; }

void warp_collective(const uint32_t* in, int n_in, uint32_t* out, int n_out,
                     const std::function<void(const uint32_t*, uint32_t*)>& combine, const char* what) {
  Launch& L = launch();
  Fiber& f = *L.cur;
  if (static_cast<int>(L.fibers.size()) < 32 * (f.warp + 1)) {
    throw Error(where_of(L, f) + ": " + what + " in a partial warp");
  }
  WarpState& w = L.warps[f.warp];
  if (w.arrived > 0 && w.what != what) {
    throw Error(where_of(L, f) + ": lane " + std::to_string(f.lane) + " reaches " + what +
                " while other lanes wait in " + w.what + " (divergent warp collective)");
  }
  std::memcpy(w.in + f.lane * kSlot, in, sizeof(uint32_t) * static_cast<size_t>(n_in));
  w.what = what;
  if (++w.arrived == 32) {
    // racecheck: the lanes meet here; what combine reads (ldmatrix) is read by this lane, after the others arrived
    race::acquire(w.acc);
    combine(w.in, w.out);
    race::release(w.acc);
    w.done = std::move(w.acc);
    w.acc.clear();
    w.arrived = 0;
    ++w.gen;
  } else {
    race::release(w.acc);
    f.wait = Wait::kWarp;
    f.wait_gen = w.gen;
    yield();
    race::acquire(w.done);
  }
  std::memcpy(out, w.out + f.lane * kSlot, sizeof(uint32_t) * static_cast<size_t>(n_out));
}

void cp_async(uint32_t smem_off, const void* src, int bytes, int src_bytes) {
  Launch& L = launch();
  Fiber& f = *L.cur;
  if (smem_off % static_cast<uint32_t>(bytes) != 0 || smem_off + static_cast<size_t>(bytes) > L.smem_bytes) {
    throw Error(where_of(L, f) + ": cp.async of " + std::to_string(bytes) + " bytes to shared offset " +
                std::to_string(smem_off) + " (dynamic shared memory: " + std::to_string(L.smem_bytes) +
                " bytes; the destination must be aligned to the copy size)");
  }
  if (src_bytes > 0) {
    const auto* s = static_cast<const unsigned char*>(src);
    if (reinterpret_cast<uintptr_t>(s) % static_cast<uintptr_t>(bytes) != 0) {
      throw Error(where_of(L, f) + ": cp.async source is not aligned to " + std::to_string(bytes) + " bytes");
    }
    if (!g_regions.empty()) {
      bool inside = false;
      for (const auto& r : g_regions) inside = inside || (s >= r.first && s + src_bytes <= r.first + r.second);
      if (!inside) throw Error(where_of(L, f) + ": cp.async reads global memory outside every tensor of the launch");
    }
  }
  const Copy c{smem_off, src, bytes, src_bytes};
  race::check(smem_off, static_cast<size_t>(bytes), true, "cp.async");
  if (src_bytes > 0) race::global(src, static_cast<size_t>(src_bytes), false, false, "cp.async");
  if (L.early_copies) {
    perform(L, c, false);
  } else {
    race::in_flight(smem_off, static_cast<size_t>(bytes), true, 1);
    f.open.push_back(c);
  }
}

void cp_async_commit() {
  Launch& L = launch();
  Fiber& f = *L.cur;
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int keep_groups) {
  Launch& L = launch();
  Fiber& f = *L.cur;
  while (static_cast<int>(f.committed.size()) > keep_groups) {
    for (const Copy& c : f.committed.front()) perform(L, c, true);
    f.committed.pop_front();
  }
}

bool global_read_ok(const void* ptr, size_t bytes) {
  if (g_regions.empty()) return true;
  const auto* s = static_cast<const unsigned char*>(ptr);
  for (const auto& r : g_regions)
    if (s >= r.first && s + bytes <= r.first + r.second) return true;
  return false;
}

int thread_rank() {
  Launch& L = launch();
  return static_cast<int>(L.cur - L.fibers.data());
}
int num_threads() { return static_cast<int>(launch().fibers.size()); }
std::string where() {
  Launch& L = launch();
  return where_of(L, *L.cur);
}
bool early_async() { return launch().early_copies; }

void block_until(std::function<bool()> ready, std::function<std::string()> describe) {
  Launch& L = launch();
  if (ready()) return;
  Fiber& f = *L.cur;
  f.ready = std::move(ready);
  f.waits_on = std::move(describe);
  f.wait = Wait::kCond;
  yield();
  f.ready = nullptr;
  f.waits_on = nullptr;
}

CtaState* cta_state(int slot) { return launch().ext[slot].get(); }
void set_cta_state(int slot, std::unique_ptr<CtaState> state) { launch().ext[slot] = std::move(state); }

void add_global_region(const void* ptr, size_t bytes) {
  if (ptr != nullptr && bytes > 0) g_regions.emplace_back(static_cast<const unsigned char*>(ptr), bytes);
}
void clear_global_regions() { g_regions.clear(); }

namespace {

// OS threads that run CTAs: ATTENTION_EXT_EMU_THREADS, else the CPUs this
// process may use (at most 16).
int workers_from_env() {
  if (const char* e = std::getenv("ATTENTION_EXT_EMU_THREADS"); e != nullptr && *e != 0) {
    char* end = nullptr;
    const long n = std::strtol(e, &end, 10);
    if (*end != 0 || n < 1 || n > 256) {
      throw Error(std::string("ATTENTION_EXT_EMU_THREADS must be a whole number from 1 to 256, got '") + e + "'");
    }
    return static_cast<int>(n);
  }
  cpu_set_t set;
  const int n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  return std::clamp(n, 1, 16);
}

// Helper threads kept for the life of the process (their fiber stacks too);
// the thread that launches is worker 0. Started again after a fork.
class Pool {
 public:
  // Runs body(w) for w = 0 .. n-1 at once and returns when every call has.
  void run(int n, const std::function<void(int)>& body) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      for (; started_ < n - 1; ++started_) std::thread([this, w = started_ + 1] { loop(w); }).detach();
      body_ = &body;
      want_ = n;
      pending_ = n - 1;
      ++gen_;
    }
    wake_.notify_all();
    body(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    body_ = nullptr;
  }

 private:
  void loop(int w) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* body = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return gen_ != seen; });
        seen = gen_;
        if (w >= want_) continue;
        body = body_;
      }
      (*body)(w);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* body_ = nullptr;
  int started_ = 0, want_ = 0, pending_ = 0;  // started_: helper threads (workers 1 .. started_)
  uint64_t gen_ = 0;
};

std::mutex g_pool_mu;  // one launch at a time uses the pool

Pool& pool() {
  // Never destroyed (detached threads may still wait on it at exit); a forked
  // child has none of the parent's threads, so it starts its own.
  static Pool* p = nullptr;
  static pid_t owner = 0;
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
  return *p;
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel, const char* name) {
  if (g_launch != nullptr) throw Error("simt: nested launch");
  const int n = static_cast<int>(block.x * block.y * block.z);
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  const bool early = early_from_env();
  const Order order = order_from_env();
  const bool racecheck = race::wanted();
  const int workers = static_cast<int>(std::min<size_t>(static_cast<size_t>(workers_from_env()), blocks));
  const auto regions = g_regions;
  struct RaceLaunch {  // racecheck's shadow of the launch's global memory
    RaceLaunch(bool on, const std::vector<std::pair<const unsigned char*, size_t>>& r) : on(on) {
      if (on) race::begin_launch(r);
    }
    ~RaceLaunch() {
      if (on) race::end_launch();
    }
    bool on;
  } race_launch(racecheck, regions);

  // Blocks are handed out in x-fastest order. After a fault no new block
  // starts; the fault of the lowest block is reported, which is the one the
  // serial order would have met first (every lower block had started).
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex err_mu;
  size_t err_block = blocks;
  std::exception_ptr err;
  const std::function<void(int)> body = [&](int w) {
    Launch L;
    L.fibers.resize(static_cast<size_t>(n));
    L.warps.resize(static_cast<size_t>((n + 31) / 32));
    L.smem.assign(std::max<size_t>(smem_bytes, 16), 0xff);
    L.smem_bytes = smem_bytes;
    L.kernel = &kernel;
    L.name = name;
    L.early_copies = early;
    L.racecheck = racecheck;
    std::mt19937 rng(12345u + static_cast<unsigned>(w));
    if (w > 0) g_regions = regions;
    g_launch = &L;
    while (!stop.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1);
      if (i >= blocks) break;
      const uint3 bidx = make_uint3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                                    static_cast<unsigned>(i / (static_cast<size_t>(grid.x) * grid.y)));
      try {
        run_block(L, grid, block, bidx, order, rng);
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (i < err_block) {
          err_block = i;
          err = std::current_exception();
        }
        stop = true;
      }
    }
    g_launch = nullptr;
    if (w > 0) g_regions.clear();
  };
  if (workers <= 1) {
    body(0);
  } else {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    pool().run(workers, body);
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace simt
}  // namespace attention_ext
