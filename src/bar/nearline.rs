//! Near-line updates (the paper's §3.5): bid events in, fresh ad
//! embeddings pushed into the live index in place.
//!
//! ```text
//!  callers ── send(key, AdFeatures) ──► pending: key -> latest features   (coalesced)
//!                                          │  FIFO of keys, Condvar
//!                                          ▼
//!                              worker thread(s): model.ad_side(features)
//!                                          │  z_a (the vector), tokens (the payload)
//!                                          ▼
//!                              Index::update_with_payload(key, z_a, tokens)
//!                                          │  (insert when the key is new)
//!                                          ▼
//!                              searches started after this see the new bid
//! ```
//!
//! Events for an ad that is still waiting are merged: only its latest
//! features are computed (a budget that changed twice in a millisecond
//! needs one embedding), and the event keeps the time of its *first*
//! unapplied send, so the measured latency is the staleness a query could
//! have seen. The queue is bounded (`capacity` distinct ads); `send` on a
//! full queue returns [`NearlineError::Full`] instead of blocking the
//! caller's request path.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::features::AdFeatures;
use super::model::BarModel;
use crate::error::Error;
use crate::index::Index;

/// Why an event was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NearlineError {
    /// `capacity` distinct ads are already waiting; retry later or raise
    /// the capacity.
    #[error("the near-line queue is full ({capacity} ads waiting)")]
    Full {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The updater was shut down.
    #[error("the near-line updater has shut down")]
    Closed,
    /// The OS refused a worker thread (`started` had started; they were
    /// stopped again). Ask for fewer workers, or raise the process's
    /// thread or memory limits.
    #[error("could not start near-line worker {started}: {message}")]
    Spawn {
        /// Workers started before the one refused.
        started: usize,
        /// The OS's reason.
        message: String,
    },
}

/// Settings of a [`NearlineUpdater`].
#[derive(Debug, Clone)]
pub struct NearlineOptions {
    /// Worker threads computing embeddings and updating the index.
    pub workers: usize,
    /// Most distinct ads waiting at once.
    pub capacity: usize,
}

impl Default for NearlineOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            capacity: 1 << 20,
        }
    }
}

/// What the updater did, for monitoring and for the freshness figures.
#[derive(Debug, Clone, Default)]
pub struct NearlineReport {
    /// Events accepted by `send`.
    pub received: u64,
    /// Events merged into one still waiting for the same ad.
    pub coalesced: u64,
    /// Updates applied to the index (updates and inserts).
    pub applied: u64,
    /// Events whose features the model or the index rejected.
    pub failed: u64,
    /// The last such failure.
    pub last_error: Option<String>,
    /// Event-to-searchable latency of every applied update, in the order
    /// applied: from the first unapplied `send` for the ad until the index
    /// update returned (after which every new search sees it).
    pub latencies: Vec<Duration>,
}

struct Pending {
    features: AdFeatures,
    since: Instant,
}

struct State {
    /// Latest unapplied features per ad.
    pending: HashMap<u64, Pending>,
    /// Ads ready for a worker, oldest first. An ad being applied is not
    /// here even if it has newer features pending: two workers never apply
    /// the same ad at once (the older features could land last); the
    /// worker that finishes it queues it again.
    order: VecDeque<u64>,
    /// Ads a worker is applying.
    in_flight: HashSet<u64>,
    open: bool,
    report: NearlineReport,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    idle: Condvar,
    capacity: usize,
}

/// A background service that recomputes an ad's embedding and payload with
/// the BAR model's ad side whenever its bid features change, and updates the
/// index in place while searches run.
///
/// ```
/// use std::sync::Arc;
/// use nann::bar::model::BarModel;
/// use nann::bar::nearline::{NearlineOptions, NearlineUpdater};
/// use nann::bar::{AdFeatures, BarConfig, BidFeatures};
/// use nann::{Index, IndexParams, Metric};
///
/// let model = Arc::new(BarModel::random(BarConfig::default(), 1).unwrap());
/// let config = model.config().clone();
/// let index = Arc::new(Index::new(
///     IndexParams::new(config.d_model, Metric::L2).payload_len(config.payload_bytes()),
/// )?);
/// let updater = NearlineUpdater::spawn(Arc::clone(&index), Arc::clone(&model), NearlineOptions::default())?;
/// let bid = BidFeatures { bid_type: 0, bid_constraint: 5.0, budget_left_ratio: 0.5,
///                         time_left_ratio: 0.5, default_bid_value: 2.0 };
/// let ad = AdFeatures { item: 3, cate: 2, brand: 1, bid };
/// updater.send(42, ad).unwrap(); // a new ad: inserted
/// updater.send(42, AdFeatures { bid: BidFeatures { budget_left_ratio: 0.9, ..bid }, ..ad }).unwrap();
/// updater.flush();
/// assert!(index.contains(42));
/// let report = updater.shutdown();
/// assert_eq!(report.failed, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct NearlineUpdater {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NearlineUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearlineUpdater")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl NearlineUpdater {
    /// Starts the workers. The index must have been built with
    /// `dim == model.config().d_model` and
    /// `payload_len == model.config().payload_bytes()`; otherwise every
    /// event fails (counted in the report) and nothing is changed.
    ///
    /// # Errors
    ///
    /// [`NearlineError::Spawn`] if the OS refuses a worker thread.
    pub fn spawn(
        index: Arc<Index>,
        model: Arc<BarModel>,
        options: NearlineOptions,
    ) -> Result<Self, NearlineError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                order: VecDeque::new(),
                in_flight: HashSet::new(),
                open: true,
                report: NearlineReport::default(),
            }),
            ready: Condvar::new(),
            idle: Condvar::new(),
            capacity: options.capacity.max(1),
        });
        let mut updater = Self {
            shared,
            workers: Vec::new(),
        };
        for started in 0..options.workers.max(1) {
            let shared = Arc::clone(&updater.shared);
            let index = Arc::clone(&index);
            let model = Arc::clone(&model);
            match std::thread::Builder::new()
                .name("nann-nearline".into())
                .spawn(move || worker(&shared, &index, &model))
            {
                Ok(handle) => updater.workers.push(handle),
                // Dropping `updater` stops the workers already started.
                Err(e) => {
                    return Err(NearlineError::Spawn {
                        started,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(updater)
    }

    /// Queues a bid event: `key`'s ad now has `features`. Returns at once.
    pub fn send(&self, key: u64, features: AdFeatures) -> Result<(), NearlineError> {
        let mut state = self.shared.state.lock();
        if !state.open {
            return Err(NearlineError::Closed);
        }
        if let Some(p) = state.pending.get_mut(&key) {
            // Keep the first send's time: the ad has been stale since then.
            p.features = features;
            state.report.received += 1;
            state.report.coalesced += 1;
            return Ok(());
        }
        if state.pending.len() >= self.shared.capacity {
            return Err(NearlineError::Full {
                capacity: self.shared.capacity,
            });
        }
        state.pending.insert(
            key,
            Pending {
                features,
                since: Instant::now(),
            },
        );
        if !state.in_flight.contains(&key) {
            state.order.push_back(key);
        }
        state.report.received += 1;
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Ads waiting to be applied.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().pending.len()
    }

    /// Waits until every event sent before this call has been applied (or
    /// has failed).
    pub fn flush(&self) {
        let mut state = self.shared.state.lock();
        loop {
            if state.pending.is_empty() && state.in_flight.is_empty() {
                return;
            }
            self.shared
                .idle
                .wait_for(&mut state, Duration::from_millis(5));
        }
    }

    /// A copy of the report so far; with `drain_latencies`, the latencies
    /// are moved out (so a long-running service does not accumulate them).
    pub fn report(&self, drain_latencies: bool) -> NearlineReport {
        let mut state = self.shared.state.lock();
        if drain_latencies {
            let latencies = std::mem::take(&mut state.report.latencies);
            NearlineReport {
                latencies,
                ..state.report.clone()
            }
        } else {
            state.report.clone()
        }
    }

    /// Applies what is queued, stops the workers and returns the report.
    pub fn shutdown(mut self) -> NearlineReport {
        self.close_and_join();
        let state = self.shared.state.lock();
        state.report.clone()
    }

    fn close_and_join(&mut self) {
        self.shared.state.lock().open = false;
        self.shared.ready.notify_all();
        for worker in self.workers.drain(..) {
            // A worker only panics if the model or index has a bug; the
            // report then shows the events it did not apply.
            let _ = worker.join();
        }
    }
}

impl Drop for NearlineUpdater {
    fn drop(&mut self) {
        self.close_and_join();
    }
}

fn worker(shared: &Shared, index: &Index, model: &BarModel) {
    loop {
        let (key, pending) = {
            let mut state = shared.state.lock();
            loop {
                if let Some(key) = state.order.pop_front() {
                    if let Some(p) = state.pending.remove(&key) {
                        // Marked before the state lock is released, so
                        // `flush` never sees the event in neither place.
                        state.in_flight.insert(key);
                        break (key, p);
                    }
                    continue;
                }
                if !state.open {
                    return;
                }
                shared.ready.wait(&mut state);
            }
        };
        let outcome = apply(index, model, key, &pending.features);
        let latency = pending.since.elapsed();
        {
            let mut state = shared.state.lock();
            match outcome {
                Ok(()) => {
                    state.report.applied += 1;
                    state.report.latencies.push(latency);
                }
                Err(e) => {
                    state.report.failed += 1;
                    state.report.last_error = Some(e.to_string());
                }
            }
            state.in_flight.remove(&key);
            // Newer features arrived while this one was applied.
            if state.pending.contains_key(&key) {
                state.order.push_front(key);
                shared.ready.notify_one();
            }
        }
        shared.idle.notify_all();
    }
}

/// Recomputes `key`'s ad side and writes it into the index.
fn apply(index: &Index, model: &BarModel, key: u64, features: &AdFeatures) -> Result<(), Error> {
    let ad = model.ad_side(features)?;
    let payload = ad.tokens.to_payload();
    match index.update_with_payload(key, &ad.vector, &payload) {
        Err(Error::KeyNotFound(_)) => index.insert_with_payload(key, &ad.vector, &payload),
        other => other,
    }
}
