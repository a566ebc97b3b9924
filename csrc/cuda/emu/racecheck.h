// Racecheck on the SIMT emulator: happens-before race detection on the
// dynamic shared memory of every CTA (ATTENTION_EXT_EMU_RACECHECK=1, read at
// each launch), what compute-sanitizer's racecheck does on a GPU.
//
// Why: the emulator's schedules (simt.h: fibers in forward / reverse / shuffled
// order, asynchronous data landing at the latest moment) turn many missing
// barriers into wrong results, but only for the orders they happen to try, and
// never a race whose two sides write the same bytes. This proves the
// ordering instead: every CUDA thread has a vector clock, every way the
// kernels order threads is an edge, and every shared-memory access is checked
// against the last write and the reads since (FastTrack, Flanagan & Freund,
// PLDI 2009).
//
// Accesses: the emulated kernels are compiled with GCC's -fsanitize=thread
// instrumentation, which calls __tsan_read4(addr) and the like before every
// load and store; racecheck.cpp defines those hooks itself (no TSan runtime is
// linked), and they look only at addresses inside the running CTA's dynamic
// shared memory, byte by byte. The asynchronous units record their own
// accesses through the functions below.
//
// Edges (the kernels' only ways to order threads):
//   __syncthreads, bar.sync / bar.arrive (named barriers), warp collectives
//   (shuffles, ldmatrix, mma: the warp's lanes meet), mbarrier arrive ->
//   the wait that sees the phase complete, a TMA load's issue -> its
//   complete-tx, and a wgmma op's completion -> every wgmma.wait_group of
//   its warpgroup that follows.
// Asynchronous accesses are in flight from issue to completion; any other
// access to their bytes meanwhile is a race:
//   cp.async      writes, from issue to the cp.async.wait_group that lands it
//   TMA load      writes, from issue to the complete-tx that lands it
//   wgmma         reads its shared-memory operands, from the issue of its last
//                 thread to its execution (the first wait that needs it)
//   TMA reduce    reads its source, from issue to the bulk wait_group
// Global memory (the launch's registered tensors), checked byte by byte too:
//   within a CTA      the same happens-before edges (bar.sync and mbarriers
//                     order global accesses as well); the last write and the
//                     last read of each byte are kept (a write racing with an
//                     earlier, unordered reader that a later read replaced is
//                     missed, never reported falsely)
//   between CTAs      nothing orders them: a byte written by one CTA and read
//                     or written by another in the same launch is a race,
//                     unless both accesses are atomic (atomicAdd, red.add)
// The emulator's own copies record their global accesses through global():
//   cp.async      reads its source at issue
//   TMA load      reads the box's bytes inside the tensor at issue
//   TMA reduce    adds each element inside the tensor atomically when performed
//                 (late: the bulk wait_group that covers it; early: at issue)
// (the issuing thread's accesses at those moments: a conflicting access
// ordered after the issue but before the copy lands is missed, never
// reported falsely).
// The first race of a CTA is reported (simt::Error) when its thread next
// yields; the report names both threads and both accesses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace attention_ext {
namespace simt {
namespace race {

// A vector clock (index: thread rank in the CTA); empty while racecheck is off.
using Clock = std::vector<uint32_t>;

// The running CTA is checked.
bool on();

// Launch lifetime (simt.cpp's run_grid, with racecheck on): the global memory
// checked is the launch's registered regions (simt::add_global_region: the
// tensors the glue hands the kernels); its shadow lives for the launch.
void begin_launch(const std::vector<std::pair<const unsigned char*, size_t>>& regions);
void end_launch();
// CTA lifetime (simt.cpp): begin after shared memory is filled, end when the
// CTA ends; set_current when the scheduler switches fibers (-1: none). cta:
// the CTA's linear index in the grid.
bool wanted();  // ATTENTION_EXT_EMU_RACECHECK (for the launch being set up)
void begin_cta(int threads, unsigned char* smem, size_t bytes, int64_t cta);
void end_cta();
void set_current(int rank);
// The report of the CTA's first race ("" if none).
const char* failure();

// Happens-before edges, for the running thread.
void release(Clock& into);        // into |= clock(current), then the current thread's clock ticks
void acquire(const Clock& from);  // clock(current) |= from
void join(Clock& into, const Clock& from);
struct Epoch {
  int rank = -1;
  uint32_t clock = 0;
};
Epoch now();                                // the current thread's epoch
void snapshot(Clock& out);                  // out = clock(current)
void add_epoch(Clock& into, const Epoch& e);  // into[e.rank] |= e.clock
void acquire_epoch(const Epoch& e);           // clock(current)[e.rank] |= e.clock

// Shared-memory bytes [off, off + bytes).
// check: the current thread's access now (and in-flight operations) without
//        recording it; access: check, then record it; record: record an
//        access at epoch e without checking (an asynchronous unit's access
//        that landed, checked at issue and kept in flight since).
void check(uint32_t off, size_t bytes, bool write, const char* what);
void access(uint32_t off, size_t bytes, bool write, const char* what);
void record(uint32_t off, size_t bytes, bool write, const Epoch& e, const char* what);
// Global bytes [p, p + bytes): check, then record, an access of the current
// thread if they lie in a registered region of the launch (an asynchronous
// unit's access, on its issuer's behalf; what: for the report).
void global(const void* p, size_t bytes, bool write, bool atomic, const char* what);
// in_flight: an asynchronous write (or read) of the bytes starts (delta 1) or ends (-1).
void in_flight(uint32_t off, size_t bytes, bool write, int delta);

}  // namespace race
}  // namespace simt
}  // namespace attention_ext
