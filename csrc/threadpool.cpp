#include "threadpool.h"

#include <unistd.h>

#include <atomic>
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

// One parallel_for call. Lives on the caller's stack; workers reach it only through Pool::current_
// (under the mutex) and the caller does not return before every worker that joined has left it.
struct Job {
  const std::function<void(int64_t, int)>* fn;
  int64_t ntasks;
  int nthreads;
  std::atomic<int64_t> next{0};  // next task to hand out
  std::atomic<int64_t> done{0};  // tasks finished
  std::atomic<int> active{0};    // workers inside drain()
};

class Pool {
 public:
  Pool() : pid_(getpid()) {}
  pid_t pid() const { return pid_; }

  void run(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    while (int(workers_.size()) < nthreads - 1) {
      const int id = int(workers_.size()) + 1;
      workers_.emplace_back([this, id] { worker_loop(id); });
    }
    Job job;
    job.fn = &fn;
    job.ntasks = ntasks;
    job.nthreads = nthreads;
    {
      std::lock_guard<std::mutex> lk(mu_);
      current_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain(job, 0);
    // Wait for tasks still running on helpers, never for helpers that have not woken up yet: on a
    // busy machine a sleeping thread can take milliseconds to get a core, and the caller does its
    // share of the work instead.
    for (int spin = 0; job.done.load(std::memory_order_acquire) < ntasks; ++spin) {
      if (spin < 4096) MOPS_PAUSE(); else std::this_thread::yield();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      current_ = nullptr;  // late helpers find no job
    }
    for (int spin = 0; job.active.load(std::memory_order_acquire) > 0; ++spin) {
      if (spin < 4096) MOPS_PAUSE(); else std::this_thread::yield();
    }
  }

 private:
  static void drain(Job& job, int tid) {
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.ntasks) break;
      (*job.fn)(t, tid);
      job.done.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void worker_loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little (back-to-back calls are common: one per layer), then sleep.
      for (int spin = 0; spin < 2048 && generation_.load(std::memory_order_acquire) == seen; ++spin)
        MOPS_PAUSE();
      Job* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = current_;
        if (job == nullptr || id >= job->nthreads) continue;
        job->active.fetch_add(1, std::memory_order_acq_rel);
      }
      drain(*job, id);
      job->active.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  pid_t pid_;
  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  Job* current_ = nullptr;
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
