// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

namespace attention_ext::cpu {
template void flash_fwd<float>(const FwdParams&, float*, bool);
template void flash_bwd<float>(const BwdParams&);
template void flash_probs<float>(const FwdParams&, float*);
}  // namespace attention_ext::cpu
