// The barrier between the ops of the fused decode stack (decode_stack.cpp): spin briefly, then sleep.
//
// A decode token crosses ~13 barriers a layer. On a quiet machine the threads arrive microseconds apart
// and a short spin is the cheapest wait. On a shared machine a thread is often descheduled mid-op, and
// libgomp's barrier (which spins up to ~300k pauses by default) keeps its partner burning the core that
// the late thread, or another process, needs. So each waiter spins kSpins pauses (tens of microseconds,
// longer than any op's imbalance on a quiet machine) and then sleeps on a futex until the last arrives.
#pragma once

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdint>

class TeamBarrier {
 public:
  static constexpr int kSpins = 2000;

  void reset(int threads) { threads_ = threads; }

  void wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {  // the last one releases the rest
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      if (sleepers_.load(std::memory_order_acquire) > 0) futex(FUTEX_WAKE_PRIVATE, INT_MAX);
      return;
    }
    for (int i = 0; i < kSpins; ++i) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      _mm_pause();
    }
    sleepers_.fetch_add(1, std::memory_order_acq_rel);
    // FUTEX_WAIT returns at once if the generation has moved on already: no wake-up is ever missed.
    while (generation_.load(std::memory_order_acquire) == generation) futex(FUTEX_WAIT_PRIVATE, generation);
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
  }

 private:
  long futex(int op, uint32_t value) {
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), op, value, nullptr, nullptr, 0);
  }

  int threads_ = 1;
  std::atomic<int> arrived_{0}, sleepers_{0};
  std::atomic<uint32_t> generation_{0};
};
