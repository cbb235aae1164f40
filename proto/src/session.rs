//! Session logic as state machines without I/O, in the quinn-proto style:
//! inputs arrive through `handle_*` methods with the current time, outputs
//! leave through `poll_*` methods, and the caller owns sockets and timers.
//!
//! - [`NodeSession`]: a node's side of its connection to a pool: when to ask
//!   for tasks, when to renew leases (the heartbeat), which results to send,
//!   when the node has drained.
//! - [`PoolConn`]: the pool's view of one connection: hello first, within a
//!   deadline, with a supported version; then only the requests of that role.

use crate::wire::{ErrorCode, LeaseId, Request, TaskGrant, TaskResult, PROTOCOL_VERSION};
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// Most results sent in one `Results` request.
pub const MAX_RESULTS_PER_REQUEST: usize = 256;

/// Most bytes of results (outputs, transcripts, receipts, as
/// [`TaskResult::approx_bytes`] counts them) in one `Results` request; a
/// result larger than this alone goes in a request of its own. Below the
/// pool's `max_results_bytes` (16 MiB + 64 KiB by default), so a node
/// holding several large outputs returns them all.
pub const MAX_RESULTS_REQUEST_BYTES: usize = 12 * 1024 * 1024;

/// What a node's session asks the node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Run this task.
    Run(TaskGrant),
    /// Stop this task: its lease is no longer ours (drop its result).
    Cancel(LeaseId),
}

/// A node's side of its session with a pool. Lives as long as the node
/// process; survives reconnects (results not yet acknowledged are resent).
#[derive(Debug)]
pub struct NodeSession {
    /// Tasks the node runs at once.
    slots: u32,
    /// Once set, ask for no new tasks; finish and return the held ones.
    draining: bool,
    /// Leases granted whose result has not been handed over yet.
    running: BTreeSet<LeaseId>,
    /// Results waiting to be sent, oldest first.
    finished: VecDeque<TaskResult>,
    /// Results sent and not yet answered (resent if the request fails).
    sending: Vec<TaskResult>,
    /// Whether a `Lease` request is in flight.
    lease_in_flight: bool,
    /// When the next `Lease` request (for work or as a heartbeat) is due.
    next_lease_at: Instant,
    /// Heartbeat period the pool asked for.
    heartbeat: Duration,
    /// Whether a hello was answered on the current connection.
    connected: bool,
    /// Events for the node.
    events: VecDeque<NodeEvent>,
}

impl NodeSession {
    /// A session for a node with `slots` task slots.
    pub fn new(slots: u32, now: Instant) -> Self {
        Self {
            slots: slots.max(1),
            draining: false,
            running: BTreeSet::new(),
            finished: VecDeque::new(),
            sending: Vec::new(),
            lease_in_flight: false,
            next_lease_at: now,
            heartbeat: Duration::from_secs(5),
            connected: false,
            events: VecDeque::new(),
        }
    }

    /// The pool answered the hello on a (new) connection.
    pub fn handle_welcome(&mut self, now: Instant, heartbeat: Duration) {
        self.connected = true;
        self.heartbeat = heartbeat.max(Duration::from_millis(10));
        self.lease_in_flight = false;
        self.next_lease_at = now;
    }

    /// The connection was lost: requests in flight are given up; results
    /// being sent go back to the queue to be resent on the next connection.
    pub fn handle_disconnect(&mut self) {
        self.connected = false;
        self.lease_in_flight = false;
        for r in self.sending.drain(..).rev() {
            self.finished.push_front(r);
        }
    }

    /// Stop taking tasks.
    pub fn handle_drain(&mut self, now: Instant) {
        self.draining = true;
        self.next_lease_at = self.next_lease_at.min(now);
    }

    /// The next request to send, if any is due.
    pub fn poll_request(&mut self, now: Instant) -> Option<Request> {
        if !self.connected {
            return None;
        }
        if self.sending.is_empty() && !self.finished.is_empty() {
            // As many as fit the byte budget (at least one), at most the count.
            let mut bytes = 0usize;
            let n = self
                .finished
                .iter()
                .take(MAX_RESULTS_PER_REQUEST)
                .take_while(|r| {
                    bytes = bytes.saturating_add(r.approx_bytes());
                    bytes <= MAX_RESULTS_REQUEST_BYTES
                })
                .count()
                .max(1);
            self.sending = self.finished.drain(..n).collect();
            return Some(Request::Results {
                results: self.sending.clone(),
            });
        }
        if !self.lease_in_flight && now >= self.next_lease_at {
            self.lease_in_flight = true;
            let want = if self.draining { 0 } else { self.free_slots() };
            self.next_lease_at = now + self.heartbeat;
            return Some(Request::Lease {
                want,
                running: self.running.iter().copied().collect(),
            });
        }
        None
    }

    fn free_slots(&self) -> u32 {
        // running holds at most `slots` leases plus whatever the pool over-granted.
        self.slots
            .saturating_sub(u32::try_from(self.running.len()).unwrap_or(u32::MAX))
    }

    /// The answer to a `Lease` request.
    pub fn handle_leases(
        &mut self,
        now: Instant,
        grants: Vec<TaskGrant>,
        lost: Vec<LeaseId>,
        retry: Duration,
    ) {
        self.lease_in_flight = false;
        for l in lost {
            if self.running.remove(&l) {
                self.events.push_back(NodeEvent::Cancel(l));
            }
        }
        let got = !grants.is_empty();
        for g in grants {
            if self.running.insert(g.lease) {
                self.events.push_back(NodeEvent::Run(g));
            }
        }
        self.next_lease_at = if self.draining {
            now + self.heartbeat
        } else if got && self.free_slots() > 0 {
            // The pool may have more: ask again at once.
            now
        } else if !got {
            now + retry.min(self.heartbeat)
        } else {
            now + self.heartbeat
        };
    }

    /// A task finished on this node.
    pub fn handle_task_done(&mut self, now: Instant, result: TaskResult) {
        if !self.running.remove(&result.lease) {
            // Cancelled meanwhile: the pool gave the task to someone else.
            return;
        }
        self.finished.push_back(result);
        if !self.draining {
            self.next_lease_at = self.next_lease_at.min(now);
        }
    }

    /// The pool answered a `Results` request: every result in it is settled
    /// (accepted, duplicate, stale or refused), so none is resent. The pool
    /// counts a lease against the node until its result is settled, so this
    /// is when it has room again: ask for work at once.
    pub fn handle_verdicts(&mut self, now: Instant) {
        self.sending.clear();
        if !self.draining && self.free_slots() > 0 {
            self.next_lease_at = self.next_lease_at.min(now);
        }
    }

    /// A request failed without an answer (the stream reset); for results
    /// this is the same as a disconnect: they are resent.
    pub fn handle_request_failed(&mut self) {
        self.handle_disconnect();
        self.connected = true;
    }

    /// The next event for the node.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When the session next needs [`poll_request`](Self::poll_request).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.connected && !self.lease_in_flight).then_some(self.next_lease_at)
    }

    /// Leases the node holds now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Draining and nothing left to finish or send.
    pub fn is_drained(&self) -> bool {
        self.draining
            && self.running.is_empty()
            && self.finished.is_empty()
            && self.sending.is_empty()
    }
}

/// The role a connection took with its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node that runs tasks.
    Node,
    /// A client that publishes, submits and reads status.
    Client,
    /// A node owner reading the node's account (ledger rows only).
    Account,
}

/// A refusal: the error to send back, and whether to close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Error code.
    pub code: ErrorCode,
    /// What and why.
    pub message: String,
    /// Close the connection after answering.
    pub close: bool,
}

/// The pool's view of one connection. A hello only asks for a role: the
/// role is granted by [`handle_admitted`](PoolConn::handle_admitted) once
/// the coordinator admits the key, and a refusal closes the connection
/// ([`handle_refused`](PoolConn::handle_refused)) whatever the peer does
/// next.
#[derive(Debug)]
pub struct PoolConn {
    /// `None` until the coordinator admits the hello; then the role.
    role: Option<Role>,
    /// The role a hello asked for, while the coordinator decides.
    asked: Option<Role>,
    /// Until when a hello may arrive.
    hello_deadline: Instant,
    /// Whether the connection is to be closed.
    closed: bool,
}

impl PoolConn {
    /// A new connection accepted at `now`; it must say hello within `hello_timeout`.
    pub fn new(now: Instant, hello_timeout: Duration) -> Self {
        Self {
            role: None,
            asked: None,
            hello_deadline: now + hello_timeout,
            closed: false,
        }
    }

    /// Check a request against the connection's state. On `Ok`, the caller
    /// serves it; on `Err`, it answers with the refusal.
    pub fn handle_request(&mut self, now: Instant, req: &Request) -> Result<(), Refusal> {
        let refuse = |code, message: String, close| Refusal {
            code,
            message,
            close,
        };
        if self.closed {
            return Err(refuse(
                ErrorCode::Protocol,
                "connection is closing".into(),
                true,
            ));
        }
        match (self.role, req) {
            (
                None,
                Request::NodeHello { .. }
                | Request::ClientHello { .. }
                | Request::AccountHello { .. },
            ) if self.asked.is_some() => Err(refuse(
                ErrorCode::Protocol,
                "a second hello while the first is decided".into(),
                false,
            )),
            (
                None,
                Request::NodeHello { protocol, .. }
                | Request::ClientHello { protocol, .. }
                | Request::AccountHello { protocol, .. },
            ) => {
                if now > self.hello_deadline {
                    self.closed = true;
                    return Err(refuse(
                        ErrorCode::Protocol,
                        "hello came too late".into(),
                        true,
                    ));
                }
                if *protocol != PROTOCOL_VERSION {
                    self.closed = true;
                    return Err(refuse(
                        ErrorCode::Version,
                        format!("protocol version {protocol} is not supported (this pool speaks {PROTOCOL_VERSION})"),
                        true,
                    ));
                }
                self.asked = Some(match req {
                    Request::NodeHello { .. } => Role::Node,
                    Request::AccountHello { .. } => Role::Account,
                    _ => Role::Client,
                });
                Ok(())
            }
            (None, other) if self.asked.is_some() => Err(refuse(
                ErrorCode::Protocol,
                format!("{} before the hello was accepted", other.name()),
                false,
            )),
            (None, other) => {
                self.closed = true;
                Err(refuse(
                    ErrorCode::Protocol,
                    format!("{} before hello", other.name()),
                    true,
                ))
            }
            (
                Some(_),
                Request::NodeHello { .. }
                | Request::ClientHello { .. }
                | Request::AccountHello { .. },
            ) => Err(refuse(
                ErrorCode::Protocol,
                "second hello on one connection".into(),
                false,
            )),
            (Some(role), other) => {
                let allowed = match other {
                    Request::Lease { .. } | Request::Results { .. } | Request::Draining => {
                        role == Role::Node
                    }
                    // Anyone admitted may read ledger rows; the coordinator
                    // decides whose.
                    Request::Ledger { .. } => true,
                    Request::FetchManifest { .. } | Request::FetchBlob { .. } => {
                        role != Role::Account
                    }
                    _ => role == Role::Client,
                };
                if allowed {
                    Ok(())
                } else {
                    Err(refuse(
                        ErrorCode::Forbidden,
                        format!("{} is not allowed on a {role:?} connection", other.name()),
                        false,
                    ))
                }
            }
        }
    }

    /// The coordinator admitted the hello: the connection has the role it
    /// asked for from now on.
    pub fn handle_admitted(&mut self) {
        if !self.closed {
            self.role = self.asked.take();
        }
    }

    /// The coordinator refused the hello (or anything else that closes the
    /// connection): no request on it is served from now on, whether or not
    /// the peer ever reads the refusal.
    pub fn handle_refused(&mut self) {
        self.asked = None;
        self.closed = true;
    }

    /// Whether the connection is to be closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The role, once the hello was accepted.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// When the connection must be closed if no hello came.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.role.is_none().then_some(self.hello_deadline)
    }

    /// Time passed: whether the connection must now be closed (half-open
    /// handshake).
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.role.is_none() && now >= self.hello_deadline {
            self.closed = true;
        }
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Bytes, Outcome};
    use crate::Digest;

    fn grant(task: u64) -> TaskGrant {
        TaskGrant {
            identity: "t".into(),
            replay: None,
            lease: LeaseId {
                task: crate::wire::TaskId(task),
                attempt: 1,
            },
            bundle: Digest::of(b"b"),
            input: Bytes(vec![]),
        }
    }

    fn done(task: u64) -> TaskResult {
        TaskResult {
            transcript: Default::default(),
            lease: LeaseId {
                task: crate::wire::TaskId(task),
                attempt: 1,
            },
            outcome: Outcome::Output(Bytes(vec![1])),
            receipt: None,
        }
    }

    /// Large outputs go in several requests, each within the byte budget
    /// (one alone if it is larger), so a node holding several returns them
    /// all; small ones share a request.
    #[test]
    fn results_are_sent_in_requests_within_the_byte_budget() {
        let t0 = Instant::now();
        let mut s = NodeSession::new(8, t0);
        s.handle_welcome(t0, Duration::from_secs(5));
        let _ = s.poll_request(t0);
        s.handle_leases(t0, (1..=6).map(grant).collect(), vec![], Duration::ZERO);
        let big = |task: u64, mib: usize| TaskResult {
            outcome: Outcome::Output(Bytes(vec![7; mib << 20])),
            ..done(task)
        };
        s.handle_task_done(t0, big(1, 9));
        s.handle_task_done(t0, big(2, 9));
        s.handle_task_done(t0, big(3, 20));
        s.handle_task_done(t0, done(4));
        s.handle_task_done(t0, done(5));
        let mut sizes = Vec::new();
        while let Some(Request::Results { results }) = s.poll_request(t0) {
            let bytes: usize = results.iter().map(TaskResult::approx_bytes).sum();
            assert!(results.len() == 1 || bytes <= MAX_RESULTS_REQUEST_BYTES);
            sizes.push(results.len());
            s.handle_verdicts(t0);
        }
        // 9 MiB, 9 MiB, 20 MiB alone, then the two small ones together.
        assert_eq!(sizes, vec![1, 1, 1, 2]);
    }

    #[test]
    fn node_asks_for_free_slots_heartbeats_and_resends_after_disconnect() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(5);
        let mut s = NodeSession::new(2, t0);
        assert_eq!(s.poll_request(t0), None, "nothing before the welcome");
        s.handle_welcome(t0, hb);
        assert_eq!(
            s.poll_request(t0),
            Some(Request::Lease {
                want: 2,
                running: vec![]
            })
        );
        assert_eq!(s.poll_request(t0), None, "one lease request at a time");
        s.handle_leases(
            t0,
            vec![grant(1), grant(2)],
            vec![],
            Duration::from_millis(100),
        );
        assert!(matches!(s.poll_event(), Some(NodeEvent::Run(_))));
        assert!(matches!(s.poll_event(), Some(NodeEvent::Run(_))));
        // Full: the next lease request is the heartbeat.
        assert_eq!(s.poll_timeout(), Some(t0 + hb));
        assert_eq!(s.poll_request(t0 + Duration::from_secs(1)), None);
        let hb_req = s.poll_request(t0 + hb).expect("heartbeat");
        assert_eq!(
            hb_req,
            Request::Lease {
                want: 0,
                running: vec![
                    LeaseId {
                        task: crate::wire::TaskId(1),
                        attempt: 1
                    },
                    LeaseId {
                        task: crate::wire::TaskId(2),
                        attempt: 1
                    }
                ]
            }
        );
        // Pool says task 2 is lost: cancel it.
        s.handle_leases(
            t0 + hb,
            vec![],
            vec![LeaseId {
                task: crate::wire::TaskId(2),
                attempt: 1,
            }],
            Duration::from_millis(100),
        );
        assert_eq!(
            s.poll_event(),
            Some(NodeEvent::Cancel(LeaseId {
                task: crate::wire::TaskId(2),
                attempt: 1
            }))
        );
        // Task 1 finishes; its result goes out; connection drops before the answer.
        let t1 = t0 + hb + Duration::from_millis(1);
        s.handle_task_done(t1, done(1));
        s.handle_task_done(t1, done(2)); // cancelled: dropped
        assert!(
            matches!(s.poll_request(t1), Some(Request::Results { results }) if results.len() == 1)
        );
        s.handle_disconnect();
        assert_eq!(s.poll_request(t1), None);
        s.handle_welcome(t1, hb);
        assert!(
            matches!(s.poll_request(t1), Some(Request::Results { results }) if results.len() == 1),
            "resent"
        );
        s.handle_verdicts(t1);
        assert_eq!(
            s.poll_request(t1),
            Some(Request::Lease {
                want: 2,
                running: vec![]
            })
        );
    }

    #[test]
    fn node_asks_again_as_soon_as_its_results_are_settled() {
        // The pool counts a lease until its result is settled, so a full node
        // whose lease request got nothing must not wait out the retry delay
        // once the verdicts arrive.
        let t0 = Instant::now();
        let mut s = NodeSession::new(1, t0);
        s.handle_welcome(t0, Duration::from_secs(5));
        let _ = s.poll_request(t0);
        s.handle_leases(t0, vec![grant(1)], vec![], Duration::ZERO);
        s.handle_task_done(t0, done(1));
        assert!(matches!(s.poll_request(t0), Some(Request::Results { .. })));
        assert!(matches!(
            s.poll_request(t0),
            Some(Request::Lease { want: 1, .. })
        ));
        // The pool had no room yet: nothing granted, retry in 1 s.
        s.handle_leases(t0, vec![], vec![], Duration::from_secs(1));
        assert_eq!(s.poll_request(t0), None);
        s.handle_verdicts(t0);
        assert!(
            matches!(s.poll_request(t0), Some(Request::Lease { want: 1, .. })),
            "asked at once, not after 1 s"
        );
    }

    #[test]
    fn draining_asks_for_nothing_and_ends_when_all_is_returned() {
        let t0 = Instant::now();
        let mut s = NodeSession::new(1, t0);
        s.handle_welcome(t0, Duration::from_secs(1));
        let _ = s.poll_request(t0);
        s.handle_leases(t0, vec![grant(7)], vec![], Duration::ZERO);
        s.handle_drain(t0);
        assert!(!s.is_drained());
        s.handle_task_done(t0, done(7));
        assert!(matches!(s.poll_request(t0), Some(Request::Results { .. })));
        assert!(!s.is_drained());
        s.handle_verdicts(t0);
        assert!(s.is_drained());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            s.poll_request(t1),
            Some(Request::Lease {
                want: 0,
                running: vec![]
            })
        );
    }

    #[test]
    fn pool_conn_requires_hello_first_in_time_with_the_right_version() {
        let t0 = Instant::now();
        let hello = |p| Request::NodeHello {
            protocol: p,
            agent: "t".into(),
            caps: Default::default(),
        };
        let mut c = PoolConn::new(t0, Duration::from_secs(5));
        let r = c
            .handle_request(t0, &Request::PoolStatus)
            .expect_err("before hello");
        assert!(r.close && r.message.contains("before hello"));

        let mut c = PoolConn::new(t0, Duration::from_secs(5));
        let r = c.handle_request(t0, &hello(99)).expect_err("version");
        assert_eq!(r.code, ErrorCode::Version);

        let mut c = PoolConn::new(t0, Duration::from_secs(5));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert!(
            c.handle_timeout(t0 + Duration::from_secs(6)),
            "half-open handshake closed"
        );

        let mut c = PoolConn::new(t0, Duration::from_secs(5));
        c.handle_request(t0, &hello(PROTOCOL_VERSION))
            .expect("hello");
        assert_eq!(c.role(), None, "no role until the coordinator admits");
        let r = c
            .handle_request(t0, &Request::PoolStatus)
            .expect_err("while the hello is decided");
        assert!(!r.close && r.message.contains("before the hello was accepted"));
        c.handle_admitted();
        assert_eq!(c.role(), Some(Role::Node));
        c.handle_request(
            t0,
            &Request::Lease {
                want: 1,
                running: vec![],
            },
        )
        .expect("lease");
        let r = c
            .handle_request(t0, &Request::PoolStatus)
            .expect_err("node cannot read pool status");
        assert_eq!(r.code, ErrorCode::Forbidden);
        assert!(!c.handle_timeout(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_refused_hello_leaves_no_role_whatever_comes_next() {
        let t0 = Instant::now();
        let mut c = PoolConn::new(t0, Duration::from_secs(5));
        c.handle_request(
            t0,
            &Request::ClientHello {
                protocol: PROTOCOL_VERSION,
                agent: "t".into(),
            },
        )
        .expect("hello");
        c.handle_refused();
        c.handle_admitted();
        assert_eq!(c.role(), None);
        assert!(c.is_closed());
        let r = c
            .handle_request(
                t0,
                &Request::JobStatus {
                    job: crate::wire::JobId(1),
                },
            )
            .expect_err("refused connection");
        assert!(r.close);
    }
}
