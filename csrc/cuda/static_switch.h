// Runtime value -> compile-time constant, for picking a kernel instantiation
// (the idea of FlashAttention's static_switch.h):
//
//   BOOL_SWITCH(env.allow_tf32, kTF32, [&] { return launch<Cfg<kTF32 ? 1 : 3>>(p); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
