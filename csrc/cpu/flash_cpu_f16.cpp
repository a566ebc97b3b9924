// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

namespace attention_ext::cpu {
template void flash_fwd<f16>(const FwdParams&, f16*, bool);
template void flash_bwd<f16>(const BwdParams&);
template void flash_probs<f16>(const FwdParams&, f16*);
}  // namespace attention_ext::cpu
