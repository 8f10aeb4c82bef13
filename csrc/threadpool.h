// A small persistent thread pool for the CPU kernels.
// Why not OpenMP: torch ships its own OpenMP runtime; a second runtime in the same process keeps its
// own spinning workers, which on small machines fight torch's threads. This pool sleeps when idle,
// takes its thread count from Python (torch.get_num_threads()) on every call, and survives fork().
#pragma once

#include <cstdint>
#include <functional>

namespace mops {

// Runs fn(task, thread_id) for task in [0, ntasks) on up to nthreads threads (the caller is one of
// them) and returns when all tasks are done. thread_id < nthreads, for per-thread scratch space.
void parallel_for(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn);

}  // namespace mops
