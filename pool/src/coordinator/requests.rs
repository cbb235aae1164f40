//! One request, one handler: [`Coordinator::handle_request`] takes a
//! request from an admitted connection (its role already checked by
//! [`PoolConn`](tidepool_proto::session::PoolConn)) and returns the response
//! to send, without I/O. The server only moves bytes: it reads frames,
//! opens results off the coordinator thread, streams blob bytes to and from
//! disk, and writes what this returns.

use super::intake::Opened;
use super::Coordinator;
use crate::store::Store;
use std::time::Instant;
use tidepool_proto::session::Refusal;
use tidepool_proto::wire::{Request, Response, PROTOCOL_VERSION};
use tidepool_proto::{Digest, PublicKey};

/// A request as the coordinator takes it.
#[derive(Debug)]
pub enum Incoming {
    /// Any request but `Results` and the blob transfers (boxed: requests
    /// are large and this moves through a channel).
    Request(Box<Request>),
    /// A `Results` request already opened with
    /// [`open_results`](super::open_results) (hashes and signatures checked
    /// off the coordinator thread).
    Results(Vec<Opened>),
}

/// What to send back: a response, or a refusal (an error response, and the
/// connection closed after it when the refusal says so).
pub type Answer = Result<Response, Refusal>;

impl<S: Store> Coordinator<S> {
    /// Serve one request from `peer` at `now` (`now_unix` stamps stored
    /// rows; `have_blob` says which blobs are complete on disk). Refusals
    /// close the connection only for hellos; later requests keep it.
    pub fn handle_request(
        &mut self,
        now: Instant,
        now_unix: u64,
        peer: &PublicKey,
        incoming: Incoming,
        have_blob: &dyn Fn(&Digest) -> bool,
    ) -> Answer {
        self.latest = self.latest.max(now);
        let req = match incoming {
            Incoming::Results(opened) => {
                return self
                    .handle_opened_results(now, peer, opened)
                    .map(Response::Verdicts)
                    .map_err(keep_open)
            }
            Incoming::Request(r) => *r,
        };
        match req {
            Request::NodeHello { caps, .. } => self
                .handle_node_hello(now, *peer, caps)
                .map(|()| self.welcome()),
            Request::ClientHello { .. } => self.handle_client_hello(peer),
            Request::AccountHello { .. } => self.handle_account_hello(peer),
            other => self.handle_after_hello(now, now_unix, peer, other, have_blob),
        }
    }

    /// A client said hello: admitted if it is a publisher or a listed client.
    fn handle_client_hello(&self, peer: &PublicKey) -> Answer {
        if self.admits_client(peer) {
            Ok(self.welcome())
        } else {
            Err(Refusal {
                code: tidepool_proto::wire::ErrorCode::Forbidden,
                message: format!(
                    "client {peer} may not use this pool (not a publisher or client key)"
                ),
                close: true,
            })
        }
    }

    /// A node owner said hello to read the node's account: admitted if the
    /// pool admits the key as a node (banned or not: a banned node may read
    /// why it earned nothing). Nothing is registered: the connection takes
    /// no work.
    fn handle_account_hello(&self, peer: &PublicKey) -> Answer {
        if self.admits_node(peer) {
            Ok(self.welcome())
        } else {
            Err(Refusal {
                code: tidepool_proto::wire::ErrorCode::Forbidden,
                message: format!("node {peer} is not on this pool's allowlist"),
                close: true,
            })
        }
    }

    /// Requests after the hello: refusals never close the connection.
    fn handle_after_hello(
        &mut self,
        now: Instant,
        now_unix: u64,
        peer: &PublicKey,
        req: Request,
        have_blob: &dyn Fn(&Digest) -> bool,
    ) -> Answer {
        let answer = match req {
            Request::Lease { want, running } => {
                self.handle_lease(now, peer, want, &running)
                    .map(|(grants, lost)| {
                        let retry_ms = if grants.is_empty() {
                            self.cfg.retry.as_millis() as u64
                        } else {
                            0
                        };
                        Response::Leases {
                            grants,
                            lost,
                            retry_ms,
                            standing: Some(self.told_standing(peer)),
                        }
                    })
            }
            Request::Results { results } => {
                let opened = super::open_results(peer, results);
                self.handle_opened_results(now, peer, opened)
                    .map(Response::Verdicts)
            }
            Request::Draining => {
                self.nodes.drain(peer);
                Ok(Response::Ok)
            }
            Request::FetchManifest { bundle } => match self.manifest(&bundle) {
                Some(m) => Ok(Response::Manifest(m.clone())),
                None => Err(super::refusal(
                    tidepool_proto::wire::ErrorCode::NotFound,
                    format!("no bundle {bundle}"),
                )),
            },
            Request::Publish { manifest } => self
                .handle_publish(now_unix, manifest, have_blob)
                .map(|(bundle, missing)| Response::Published { bundle, missing }),
            Request::Submit {
                bundle,
                inputs,
                key,
            } => {
                let inputs: Vec<Vec<u8>> = inputs.into_iter().map(|b| b.0).collect();
                self.handle_submit(now_unix, peer, &bundle, &key, &inputs)
                    .map(|(job, tasks)| Response::Submitted { job, tasks })
            }
            Request::OpenJob {
                bundle,
                key,
                priority,
            } => self
                .handle_open_job(now_unix, peer, &bundle, &key, priority)
                .map(|(job, have, sealed)| Response::JobOpened { job, have, sealed }),
            Request::AppendInputs { job, from, inputs } => {
                let inputs: Vec<Vec<u8>> = inputs.into_iter().map(|b| b.0).collect();
                self.handle_append_inputs(now_unix, peer, job, from, &inputs)
                    .map(|have| Response::Appended { job, have })
            }
            Request::SealJob { job, total } => self
                .handle_seal_job(peer, job, total)
                .map(|tasks| Response::Submitted { job, tasks }),
            Request::ForgetJob { job } => self.handle_forget_job(peer, job).map(|()| Response::Ok),
            Request::Collect if !self.is_admin(peer) => Err(super::refusal(
                tidepool_proto::wire::ErrorCode::Forbidden,
                "only the pool's admins may ask it to collect",
            )),
            Request::Collect => {
                self.handle_gc(now)
                    .map_err(Into::into)
                    .map(|p| Response::Collected {
                        jobs: u32::try_from(p.jobs.len()).unwrap_or(u32::MAX),
                        tasks: p.tasks,
                        bytes: p.bytes,
                    })
            }
            Request::CancelJob { job } => {
                self.handle_cancel_job(peer, job)
                    .map(|(waiting, running)| Response::Cancelled {
                        job,
                        waiting,
                        running,
                    })
            }
            Request::JobStatus { job } => self
                .visible(peer, job)
                .and_then(|()| self.job_status(job))
                .map(Response::Job),
            Request::JobResults { job, from, limit } => self
                .visible(peer, job)
                .and_then(|()| self.job_results(job, from, limit))
                .map(Response::Records),
            Request::Replayable { job, index } => self
                .visible(peer, job)
                .and_then(|()| self.replayable(job, index))
                .map(|r| Response::Replayable(Box::new(r))),
            Request::PoolStatus => self.pool_status(now).map(|mut s| {
                if !self.is_admin(peer) {
                    s.jobs.retain(|j| self.sees(peer, j.job));
                }
                Response::Pool(s)
            }),
            Request::Challenge { task } => {
                self.handle_client_challenge(now, peer, task)
                    .map(|c| Response::Challenged {
                        task: c.target,
                        job: c.job,
                        index: c.index,
                        state: c.state,
                    })
            }
            Request::Ledger {
                query,
                as_of,
                after,
                limit,
            } => self
                .ledger_page(peer, now_unix, query, as_of, after, limit)
                .map(Response::LedgerPage),
            Request::AddCanaries { bundle, items } => self
                .handle_add_canaries(peer, &bundle, items)
                .map(|count| Response::Canaries { count }),
            // Blob bytes move between the connection and the blob
            // directory; the server asks only `blob_size` and tells
            // `handle_blob_stored`.
            Request::FetchBlob { .. } | Request::PutBlob { .. } => Err(super::refusal(
                tidepool_proto::wire::ErrorCode::Internal,
                "blob transfers are served by the connection, not the coordinator",
            )),
            Request::NodeHello { .. }
            | Request::ClientHello { .. }
            | Request::AccountHello { .. } => Err(super::refusal(
                tidepool_proto::wire::ErrorCode::Protocol,
                "second hello on one connection",
            )),
        };
        answer.map_err(keep_open)
    }

    /// `Ok` if `peer` may see `job`; otherwise the same answer as for a job
    /// that does not exist (so ids tell a stranger nothing).
    fn visible(&self, peer: &PublicKey, job: tidepool_proto::wire::JobId) -> Result<(), Refusal> {
        if self.sees(peer, job) {
            Ok(())
        } else {
            Err(super::refusal(
                tidepool_proto::wire::ErrorCode::NotFound,
                format!("no job {job}"),
            ))
        }
    }

    /// The answer to an accepted hello: the pool's protocol and timings.
    fn welcome(&self) -> Response {
        Response::Welcome {
            protocol: PROTOCOL_VERSION,
            agent: concat!("tidepool-pool ", env!("CARGO_PKG_VERSION")).to_owned(),
            lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
        }
    }
}

/// After the hello a refusal answers the one request; the connection stays.
fn keep_open(r: Refusal) -> Refusal {
    Refusal { close: false, ..r }
}
