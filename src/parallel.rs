//! A minimal work-sharing loop on scoped std threads, for batch search and
//! bulk build. Items are claimed in small blocks from one atomic counter, so
//! uneven per-item costs balance out without a dependency on a thread pool.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Most threads one batch call starts, whatever it is asked for: past the
/// cores, more threads only add stacks.
const MAX_THREADS: usize = 1024;

/// Number of threads to use for `requested` (0 = all available cores).
pub(crate) fn thread_count(requested: usize, items: usize) -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = if requested == 0 { available } else { requested };
    wanted.clamp(1, items.clamp(1, MAX_THREADS))
}

/// Computes `f(i)` for `i in 0..n` on `threads` threads; results in order.
/// The caller's thread is one of them, so a thread the OS refuses to start
/// costs speed, not the call (std's `scope.spawn` would panic instead).
pub(crate) fn map_indexed<T, F>(n: usize, threads: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    const BLOCK: usize = 16;
    let threads = thread_count(threads, n);
    if threads == 1 {
        return (0..n).map(f).collect();
    }
    // Relaxed: the counter only hands out disjoint blocks; results travel back
    // through `join`, which synchronises.
    let next = AtomicUsize::new(0);
    let work = || {
        let mut out = Vec::new();
        loop {
            let start = next.fetch_add(BLOCK, Ordering::Relaxed);
            if start >= n {
                break;
            }
            for i in start..(start + BLOCK).min(n) {
                out.push((i, f(i)));
            }
        }
        out
    };
    let mut parts: Vec<Vec<(usize, T)>> = std::thread::scope(|scope| {
        // A worker that cannot be started is dropped: the others claim its
        // blocks from the same counter.
        let workers: Vec<_> = (1..threads)
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut parts = vec![work()];
        parts.extend(workers.into_iter().map(|w| {
            w.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }));
        parts
    });
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for part in parts.drain(..) {
        for (i, value) in part {
            slots[i] = Some(value);
        }
    }
    slots.into_iter().flatten().collect()
}

/// Threads for a one-off pass over `items` items (validating an opened
/// file, filling its key map): every core (at most 16), but one below
/// `min_items`, where starting threads costs more than it saves, and
/// always one under loom, whose models run their own threads.
#[cfg_attr(loom, allow(unused_variables))]
pub(crate) fn pass_workers(items: usize, min_items: usize) -> usize {
    #[cfg(loom)]
    return 1;
    #[cfg(not(loom))]
    if items < min_items {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    }
}

/// Runs `f(w)` for every worker `w in 0..workers`, worker 0 on the caller's
/// thread and the others on scoped threads joined before returning; results
/// in worker order. A thread that cannot be started runs its worker inline
/// (std's `scope.spawn` would panic instead).
pub(crate) fn run_workers<R: Send>(workers: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if workers <= 1 {
        return vec![f(0)];
    }
    let f = &f;
    std::thread::scope(|scope| {
        let spawned: Vec<_> = (1..workers)
            .map(|w| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || f(w))
                    .map_err(|_| w)
            })
            .collect();
        let mut results = Vec::with_capacity(workers);
        results.push(f(0));
        for handle in spawned {
            results.push(match handle {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(w) => f(w),
            });
        }
        results
    })
}
