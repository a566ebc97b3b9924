// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

namespace attention_ext::cpu {
template void flash_fwd<bf16>(const FwdParams&);
template void flash_bwd<bf16>(const BwdParams&);
template void flash_probs<bf16>(const FwdParams&, bf16*);
}  // namespace attention_ext::cpu
