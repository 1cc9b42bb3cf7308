// std::bit_cast for C++17: PyTorch builds extensions as C++17 in some releases (2.11 does), where <bit>
// has no bit_cast and the kernels would not build. memcpy of a register-sized value compiles to a move.
#pragma once

#include <cstring>

template <class To, class From>
inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as reinterprets values of equal size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
