// One element type per translation unit (compile time, and parallel builds).
#include "flash_cpu.h"

namespace attention_ext::cpu {
template void flash_fwd<double>(const FwdParams&, double*, bool);
template void flash_bwd<double>(const BwdParams&);
template void flash_probs<double>(const FwdParams&, double*);
}  // namespace attention_ext::cpu
