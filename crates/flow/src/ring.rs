//! The agent's flow buffer: the last N flows, with what was lost counted, and followers.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::api::FlowsRequest;
use crate::flow::Flow;

/// Hubble's default buffer size.
pub const DEFAULT_CAPACITY: usize = 4095;

/// Counters of a [`FlowRing`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RingStats {
    /// How many flows the ring holds at most.
    pub capacity: usize,
    /// How many it holds now.
    pub len: usize,
    /// Flows pushed since the ring was made.
    pub received: u64,
    /// Flows pushed out by newer ones.
    pub evicted: u64,
    /// Events the kernel could not send (rate limit or full ring buffer), as the datapath last
    /// reported them: they never reached the ring.
    pub lost_in_kernel: u64,
}

#[derive(Debug)]
struct Inner {
    flows: VecDeque<Arc<Flow>>,
    capacity: usize,
    /// Sequence number of the next flow pushed; the oldest held is `next_seq - flows.len()`.
    next_seq: u64,
    evicted: u64,
    lost_in_kernel: u64,
    closed: bool,
}

impl Inner {
    fn first_seq(&self) -> u64 {
        self.next_seq - self.flows.len() as u64
    }
}

/// A bounded buffer of the most recent flows, shared by the event reader (which pushes) and
/// any number of readers and followers.
#[derive(Debug)]
pub struct FlowRing {
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// A follower's position in a [`FlowRing`]: the sequence number of the next flow it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    next_seq: u64,
}

/// What a follower gets from [`FlowRing::wait`].
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The flows after the cursor, oldest first.
    pub flows: Vec<Arc<Flow>>,
    /// Flows evicted before the follower read them.
    pub missed: u64,
    /// The ring was closed: nothing more will come.
    pub closed: bool,
}

impl Default for FlowRing {
    fn default() -> Self {
        FlowRing::new(DEFAULT_CAPACITY)
    }
}

impl FlowRing {
    /// A ring of the last `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlowRing {
            inner: Mutex::new(Inner {
                flows: VecDeque::with_capacity(capacity.min(65_536)),
                capacity,
                next_seq: 0,
                evicted: 0,
                lost_in_kernel: 0,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, flow: Flow) {
        self.extend(std::iter::once(flow));
    }

    /// Pushes a batch under one lock and wakes followers once.
    pub fn extend(&self, flows: impl IntoIterator<Item = Flow>) {
        let mut g = self.lock();
        let mut any = false;
        for f in flows {
            if g.flows.len() == g.capacity {
                g.flows.pop_front();
                g.evicted += 1;
            }
            g.flows.push_back(Arc::new(f));
            g.next_seq += 1;
            any = true;
        }
        drop(g);
        if any {
            self.changed.notify_all();
        }
    }

    /// Records the datapath's cumulative count of events lost in the kernel
    /// (`palisade_datapath::Metrics::lost_events`).
    pub fn set_lost_in_kernel(&self, total: u64) {
        self.lock().lost_in_kernel = total;
    }

    pub fn stats(&self) -> RingStats {
        let g = self.lock();
        RingStats {
            capacity: g.capacity,
            len: g.flows.len(),
            received: g.next_seq,
            evicted: g.evicted,
            lost_in_kernel: g.lost_in_kernel,
        }
    }

    /// The last `n` flows, oldest first.
    pub fn last(&self, n: usize) -> Vec<Arc<Flow>> {
        let g = self.lock();
        let skip = g.flows.len().saturating_sub(n);
        g.flows.iter().skip(skip).cloned().collect()
    }

    /// Every flow at or after `t`, oldest first.
    pub fn since(&self, t: SystemTime) -> Vec<Arc<Flow>> {
        self.lock()
            .flows
            .iter()
            .filter(|f| f.time >= t)
            .cloned()
            .collect()
    }

    /// What a request asks of the buffer: the flows that match its filter and time bounds,
    /// the last `request.last` of them if set, oldest first.
    pub fn query(&self, request: &FlowsRequest) -> Vec<Arc<Flow>> {
        self.snapshot(request).0
    }

    /// [`FlowRing::query`] and a cursor right after the newest flow, taken together, so a
    /// follower continues from the snapshot without a gap or a duplicate.
    pub fn snapshot(&self, request: &FlowsRequest) -> (Vec<Arc<Flow>>, Cursor) {
        let g = self.lock();
        let cursor = Cursor {
            next_seq: g.next_seq,
        };
        let mut out: Vec<Arc<Flow>> = g
            .flows
            .iter()
            .filter(|f| request.matches(f))
            .cloned()
            .collect();
        drop(g);
        if let Some(n) = request.last {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        (out, cursor)
    }

    /// A cursor after the newest flow: following it yields only flows pushed from now on.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            next_seq: self.lock().next_seq,
        }
    }

    /// Waits up to `timeout` for flows after `cursor`, then returns them (possibly none) and
    /// moves the cursor past them.
    pub fn wait(&self, cursor: &mut Cursor, timeout: Duration) -> Batch {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.next_seq == cursor.next_seq && !g.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let first = g.first_seq();
        let missed = first.saturating_sub(cursor.next_seq);
        let from = cursor.next_seq.max(first);
        let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
        let flows = g.flows.iter().skip(skip).cloned().collect();
        cursor.next_seq = g.next_seq;
        Batch {
            flows,
            missed,
            closed: g.closed,
        }
    }

    /// Wakes every follower for good (agent shutdown).
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::filter::FilterFlags;
    use crate::flow::Verdict;
    use crate::time::from_unix_nanos;

    fn flow(i: u32) -> Flow {
        let mut f = crate::testutil::flow();
        f.time = from_unix_nanos(i128::from(i) * 1_000_000_000);
        f.source.identity = i;
        if i % 2 == 1 {
            f.verdict = Verdict::Dropped;
        }
        f
    }

    fn ids(flows: &[Arc<Flow>]) -> Vec<u32> {
        flows.iter().map(|f| f.source.identity).collect()
    }

    #[test]
    fn evicts_the_oldest_and_counts() {
        let ring = FlowRing::new(3);
        for i in 0..5 {
            ring.push(flow(i));
        }
        assert_eq!(ids(&ring.last(10)), vec![2, 3, 4]);
        assert_eq!(ids(&ring.last(2)), vec![3, 4]);
        assert_eq!(ids(&ring.last(0)), Vec::<u32>::new());
        ring.set_lost_in_kernel(17);
        assert_eq!(
            ring.stats(),
            RingStats {
                capacity: 3,
                len: 3,
                received: 5,
                evicted: 2,
                lost_in_kernel: 17
            }
        );
        assert_eq!(FlowRing::new(0).stats().capacity, 1);
    }

    #[test]
    fn since_last_and_query() {
        let ring = FlowRing::new(10);
        ring.extend((0..6).map(flow));
        assert_eq!(
            ids(&ring.since(from_unix_nanos(3_000_000_000))),
            vec![3, 4, 5]
        );
        let mut req = FlowsRequest::default();
        assert_eq!(ids(&ring.query(&req)), vec![0, 1, 2, 3, 4, 5]);
        req.last = Some(2);
        assert_eq!(ids(&ring.query(&req)), vec![4, 5]);
        req.filter = FilterFlags {
            verdict: vec!["DROPPED".to_owned()],
            ..FilterFlags::default()
        }
        .build()
        .unwrap();
        assert_eq!(
            ids(&ring.query(&req)),
            vec![3, 5],
            "last N of the matching flows"
        );
        req.last = None;
        req.since = Some(from_unix_nanos(2_000_000_000));
        assert_eq!(ids(&ring.query(&req)), vec![3, 5]);
        req.until = Some(from_unix_nanos(4_000_000_000));
        assert_eq!(ids(&ring.query(&req)), vec![3]);
    }

    #[test]
    fn followers_get_new_flows_and_count_what_they_missed() {
        let ring = FlowRing::new(3);
        ring.push(flow(0));
        let mut c = ring.cursor();
        let b = ring.wait(&mut c, Duration::from_millis(10));
        assert!(b.flows.is_empty() && b.missed == 0 && !b.closed);
        ring.extend((1..3).map(flow));
        let b = ring.wait(&mut c, Duration::from_millis(10));
        assert_eq!(ids(&b.flows), vec![1, 2]);
        assert_eq!(b.missed, 0);
        // The follower falls behind by more than the ring holds.
        ring.extend((3..8).map(flow));
        let b = ring.wait(&mut c, Duration::ZERO);
        assert_eq!(ids(&b.flows), vec![5, 6, 7]);
        assert_eq!(b.missed, 2);
        assert_eq!(ring.stats().evicted, 5);
    }

    #[test]
    fn wait_wakes_on_push_and_close() {
        let ring = Arc::new(FlowRing::new(8));
        let mut c = ring.cursor();
        let r = ring.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            r.push(flow(1));
            thread::sleep(Duration::from_millis(50));
            r.close();
        });
        let start = Instant::now();
        let b = ring.wait(&mut c, Duration::from_secs(10));
        assert_eq!(ids(&b.flows), vec![1]);
        assert!(start.elapsed() < Duration::from_secs(5));
        let b = ring.wait(&mut c, Duration::from_secs(10));
        assert!(b.closed && b.flows.is_empty());
        assert!(ring.is_closed());
        t.join().unwrap();
    }
}
