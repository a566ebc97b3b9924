// The backward's workspace, shared by the two glues that launch the CUDA
// kernels (attention_cuda.cpp on the GPU, emu/attention_emu.cpp on the CPU
// emulator), so that the emulated path allocates and wires exactly what the
// GPU path does. ATen-level: the tensors come from the caching allocator of
// the query's device.
#pragma once

#include <ATen/ATen.h>

#include "launch.h"

namespace attention_ext {
namespace cuda {

struct BwdWorkspace {
  at::Tensor dq_accum;  // nsplit x rows x head_dim fp32, zero-filled
  at::Tensor stats;     // 3 x rows fp32: row shift, logl, D
  BwdWork work;         // points into both
  FwdStats row_stats;   // for launch_row_stats
};

inline BwdWorkspace make_bwd_workspace(const BwdParams& p, const BwdEntry& e, int num_sms,
                                       const at::TensorOptions& like) {
  BwdWorkspace ws;
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  ws.work = plan_bwd_work(p, e, num_sms, p.deterministic);
  ws.dq_accum = at::zeros({ws.work.nsplit, rows, e.head_dim}, like.dtype(at::kFloat));
  ws.stats = at::empty({3, rows}, like.dtype(at::kFloat));
  ws.work.dq_accum = ws.dq_accum.data_ptr<float>();
  ws.row_stats = bwd_row_stats(p, ws.stats.data_ptr<float>());
  ws.work.row_shift = ws.row_stats.shift;
  ws.work.row_logl = ws.row_stats.logl;
  ws.work.dsum = ws.row_stats.dsum;
  return ws;
}

}  // namespace cuda
}  // namespace attention_ext
