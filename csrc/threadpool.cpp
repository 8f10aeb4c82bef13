#include "threadpool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOPS_PAUSE() _mm_pause()
#else
#define MOPS_PAUSE() std::this_thread::yield()
#endif

namespace mops {
namespace {

class Pool {
 public:
  explicit Pool() : pid_(getpid()) {}
  pid_t pid() const { return pid_; }

  void run(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    int nworkers = nthreads - 1;
    while (int(workers_.size()) < nworkers) {
      int id = int(workers_.size()) + 1;
      workers_.emplace_back([this, id] { worker_loop(id); });
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0, std::memory_order_relaxed);
      wanted_ = nworkers;
      finished_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain(0);
    // Wait for the helpers; they are usually done by now, so spin briefly before sleeping.
    for (int spin = 0; finished_.load(std::memory_order_acquire) < nworkers; ++spin) {
      if (spin < 4096) {
        MOPS_PAUSE();
      } else {
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return finished_.load(std::memory_order_acquire) >= nworkers; });
      }
    }
    fn_ = nullptr;
  }

 private:
  void drain(int tid) {
    for (;;) {
      int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks_) break;
      (*fn_)(t, tid);
    }
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little (back-to-back calls are common: one per layer), then sleep.
      for (int spin = 0; spin < 2048 && generation_.load(std::memory_order_acquire) == seen; ++spin)
        MOPS_PAUSE();
      int wanted;
      {
        // Read the generation and its thread count together, so that a worker that lags behind
        // one call never joins the next one twice.
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        wanted = wanted_;
      }
      if (id > wanted) continue;  // this call uses fewer threads
      drain(id);
      if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == wanted) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_one();
      }
    }
  }

  pid_t pid_;
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t ntasks_ = 0;
  int wanted_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> finished_{0};
  std::atomic<uint64_t> generation_{0};
};

Pool* g_pool = nullptr;
std::mutex g_pool_mu;

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  // Deliberately leaked: no join at exit (workers may sleep forever), and after fork() the child
  // has no worker threads, so it starts a fresh pool instead of waiting on dead ones.
  if (g_pool == nullptr || g_pool->pid() != getpid()) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void parallel_for(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn) {
  if (ntasks <= 0) return;
  if (nthreads > ntasks) nthreads = int(ntasks);
  if (nthreads > 256) nthreads = 256;
  if (nthreads <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t, 0);
    return;
  }
  pool().run(nthreads, ntasks, fn);
}

}  // namespace mops
