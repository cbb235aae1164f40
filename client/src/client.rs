//! A client of a pool over QUIC: publish bundles, submit batches, read
//! status and results. Used by the `tidepool` CLI and by tests.

use crate::bundle::BundleFile;
use std::net::SocketAddr;
use tidepool_net::{call, StreamError};
use tidepool_proto::ledger::{LedgerError, LedgerQuery, StatementFile, MAX_PAGE_ROWS};
use tidepool_proto::wire::{
    Bytes, Canary, ErrorCode, JobId, JobSummary, PoolSummary, Request, Response, TaskId,
    TaskRecord, BLOB_CHUNK_BYTES, PROTOCOL_VERSION,
};
use tidepool_proto::{Digest, PublicKey, SecretKey};

/// Errors talking to a pool.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error(transparent)]
    Net(#[from] tidepool_net::NetError),
    /// A request failed in transit.
    #[error("pool connection: {0}")]
    Stream(#[from] StreamError),
    /// The pool refused the request.
    #[error("pool refused: {message} ({code:?})")]
    Refused {
        /// Kind.
        code: ErrorCode,
        /// The pool's message.
        message: String,
    },
    /// The pool answered with the wrong message.
    #[error("pool answered {0} unexpectedly")]
    Unexpected(String),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The bundle is not signed.
    #[error("bundle is not signed")]
    Unsigned,
    /// A ledger page from the pool does not check out.
    #[error("the pool's ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// An input is larger than any task may take: nothing of it was sent.
    #[error(
        "input {index} is {bytes} bytes, over the largest a task may take \
         ({max} bytes): split it, or pass it by reference"
    )]
    InputTooLarge {
        /// Its place in the batch (from 0).
        index: u64,
        /// Its size.
        bytes: usize,
        /// [`MAX_ITEM_BYTES`](tidepool_proto::wire::MAX_ITEM_BYTES).
        max: usize,
    },
}

/// Refuse input `index` if it is larger than a task may take.
pub fn check_input_size(index: u64, input: &[u8]) -> Result<(), ClientError> {
    let max = tidepool_proto::wire::MAX_ITEM_BYTES;
    if input.len() > max {
        return Err(ClientError::InputTooLarge {
            index,
            bytes: input.len(),
            max,
        });
    }
    Ok(())
}

/// A connection to a pool as a client. Lives for one CLI command or test.
#[derive(Debug)]
pub struct PoolClient {
    /// The endpoint (kept so it outlives the connection).
    endpoint: quinn::Endpoint,
    /// The connection.
    conn: quinn::Connection,
    /// The pool's key (pinned by the handshake; checks ledger pages).
    pool: PublicKey,
}

/// What the client calls itself in its hello.
const AGENT: &str = concat!("tidepool ", env!("CARGO_PKG_VERSION"));

/// Input bytes one submission message carries at most (half the pool's
/// default frame limit: room for the encoding and for pools that set it
/// lower).
pub const SUBMIT_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Bytes an input adds to a message besides its own (MessagePack header).
const INPUT_OVERHEAD: usize = 8;

fn unexpected(r: &Response) -> ClientError {
    let s = format!("{r:?}");
    ClientError::Unexpected(s.chars().take(120).collect())
}

impl PoolClient {
    /// Connect and say hello.
    pub async fn connect(
        addr: SocketAddr,
        key: &SecretKey,
        pool: PublicKey,
    ) -> Result<Self, ClientError> {
        Self::connect_with(
            addr,
            key,
            pool,
            Request::ClientHello {
                protocol: PROTOCOL_VERSION,
                agent: AGENT.into(),
            },
        )
        .await
    }

    /// Connect with a node's key to read its account (its ledger rows);
    /// the connection takes no work.
    pub async fn connect_account(
        addr: SocketAddr,
        node_key: &SecretKey,
        pool: PublicKey,
    ) -> Result<Self, ClientError> {
        Self::connect_with(
            addr,
            node_key,
            pool,
            Request::AccountHello {
                protocol: PROTOCOL_VERSION,
                agent: AGENT.into(),
            },
        )
        .await
    }

    async fn connect_with(
        addr: SocketAddr,
        key: &SecretKey,
        pool: PublicKey,
        hello: Request,
    ) -> Result<Self, ClientError> {
        let endpoint = tidepool_net::client(key, pool)?;
        let conn = tidepool_net::connect(&endpoint, addr).await?;
        let me = Self {
            endpoint,
            conn,
            pool,
        };
        match me.call(&hello).await? {
            Response::Welcome { .. } => Ok(me),
            other => Err(unexpected(&other)),
        }
    }

    /// Every page of the ledger for `query`, checked (the pool's signature
    /// on each page, the chain, every receipt), as a statement file.
    /// `progress` is told the rows fetched so far.
    pub async fn ledger(
        &self,
        query: LedgerQuery,
        mut progress: impl FnMut(usize),
    ) -> Result<StatementFile, ClientError> {
        let mut pages = Vec::new();
        let mut as_of = None;
        let mut after = None;
        let mut rows = 0;
        loop {
            let page = match self
                .call(&Request::Ledger {
                    query: query.clone(),
                    as_of,
                    after,
                    limit: MAX_PAGE_ROWS,
                })
                .await?
            {
                Response::LedgerPage(p) => p,
                other => return Err(unexpected(&other)),
            };
            let opened = page.open(&self.pool, pages.len() + 1)?;
            if opened.next.is_some() && (opened.next == after || opened.rows.is_empty()) {
                return Err(ClientError::Ledger(LedgerError::Chain {
                    page: pages.len() + 1,
                    why: "the pool's pages stopped moving forward".into(),
                }));
            }
            rows += opened.rows.len();
            progress(rows);
            as_of = Some(opened.as_of);
            after = opened.next;
            pages.push(page);
            if after.is_none() {
                break;
            }
        }
        Ok(StatementFile::from_pages(&self.pool, &pages)?)
    }

    async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        match call(&self.conn, req).await? {
            Response::Error { code, message } => Err(ClientError::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// Publish a signed bundle and upload the blobs the pool lacks.
    /// Returns the bundle digest.
    pub async fn publish(
        &self,
        bundle: &BundleFile,
        mut progress: impl FnMut(u64),
    ) -> Result<Digest, ClientError> {
        let signed = bundle.signed().ok_or(ClientError::Unsigned)?;
        let (digest, missing) = match self.call(&Request::Publish { manifest: signed }).await? {
            Response::Published { bundle, missing } => (bundle, missing),
            other => return Err(unexpected(&other)),
        };
        for blob in missing {
            let path = bundle.files.get(&blob).ok_or_else(|| ClientError::Io {
                path: "<bundle>".into(),
                source: std::io::Error::other(format!("no file for blob {blob} in the bundle")),
            })?;
            let data = std::fs::read(path).map_err(|source| ClientError::Io {
                path: path.clone(),
                source,
            })?;
            let mut offset = 0u64;
            // Resume where the pool stopped (a previous interrupted upload).
            if let Response::BlobStored { have, .. } = self
                .call(&Request::PutBlob {
                    digest: blob,
                    offset: 0,
                    data: Bytes(Vec::new()),
                })
                .await
                .unwrap_or(Response::Ok)
            {
                offset = have;
            }
            while (offset as usize) < data.len() {
                let end = (offset as usize + BLOB_CHUNK_BYTES).min(data.len());
                let chunk = Bytes(data[offset as usize..end].to_vec());
                match self
                    .call(&Request::PutBlob {
                        digest: blob,
                        offset,
                        data: chunk,
                    })
                    .await?
                {
                    Response::BlobStored { have, .. } => {
                        progress(have - offset);
                        offset = have;
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
        Ok(digest)
    }

    /// Submit a batch. `key` makes the submission idempotent. A batch whose
    /// inputs fit in one chunk of [`SUBMIT_CHUNK_BYTES`] goes in one
    /// message; a larger one in chunks ([`submit_chunked`](Self::submit_chunked)).
    pub async fn submit(
        &self,
        bundle: Digest,
        inputs: Vec<Vec<u8>>,
        key: String,
    ) -> Result<(JobId, u32), ClientError> {
        for (index, input) in inputs.iter().enumerate() {
            check_input_size(index as u64, input)?;
        }
        let bytes: usize = inputs.iter().map(|i| i.len() + INPUT_OVERHEAD).sum();
        if bytes > SUBMIT_CHUNK_BYTES {
            return self
                .submit_chunked(
                    bundle,
                    key,
                    0,
                    inputs.into_iter().map(Ok),
                    SUBMIT_CHUNK_BYTES,
                    |_| {},
                )
                .await;
        }
        let inputs = inputs.into_iter().map(Bytes).collect();
        match self
            .call(&Request::Submit {
                bundle,
                inputs,
                key,
            })
            .await?
        {
            Response::Submitted { job, tasks } => Ok((job, tasks)),
            other => Err(unexpected(&other)),
        }
    }

    /// Submit inputs read lazily from `inputs`, in chunks of at most
    /// `chunk_bytes` (an input larger than that goes alone): open the job
    /// `key` names (or find it), skip the inputs the pool already holds —
    /// so running this again after a lost connection resumes where the
    /// pool stopped — append the rest, and seal. `progress` gets the number
    /// of inputs the pool holds after each chunk. Memory: one chunk.
    /// `priority`: higher is served first (the pool caps it; 0 normal).
    pub async fn submit_chunked<I>(
        &self,
        bundle: Digest,
        key: String,
        priority: i8,
        inputs: I,
        chunk_bytes: usize,
        mut progress: impl FnMut(u32),
    ) -> Result<(JobId, u32), ClientError>
    where
        I: IntoIterator<Item = Result<Vec<u8>, ClientError>>,
    {
        let (job, have, sealed) = self.open_job(bundle, key, priority).await?;
        progress(have);
        let mut inputs = inputs.into_iter();
        // Inputs the pool holds: read past them (the pool compared them
        // when they arrived; it compares again any that are re-sent).
        let mut total: u32 = 0;
        while total < have {
            match inputs.next() {
                Some(i) => {
                    i?;
                    total += 1;
                }
                None => break,
            }
        }
        if sealed {
            if total != have || inputs.next().is_some() {
                return Err(ClientError::Refused {
                    code: ErrorCode::Invalid,
                    message: format!(
                        "job {job} was sealed with {have} inputs; these are not the same batch"
                    ),
                });
            }
            return Ok((job, have));
        }
        let mut chunk: Vec<Bytes> = Vec::new();
        let mut chunk_size = 0usize;
        let mut from = total;
        loop {
            let next = inputs.next().transpose()?;
            if let Some(i) = &next {
                // Before anything of it is sent (what came before stays
                // in the open job: fix the input and run this again).
                check_input_size(u64::from(from) + chunk.len() as u64, i)?;
            }
            let flush = match &next {
                Some(i) => !chunk.is_empty() && chunk_size + i.len() + INPUT_OVERHEAD > chunk_bytes,
                None => !chunk.is_empty(),
            };
            if flush {
                let sent = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                let held = self
                    .append_inputs(job, from, std::mem::take(&mut chunk))
                    .await?;
                from += sent;
                if held != from {
                    return Err(ClientError::Unexpected(format!(
                        "job {job} holds {held} inputs after {from} were sent"
                    )));
                }
                chunk_size = 0;
                progress(held);
            }
            match next {
                Some(i) => {
                    chunk_size += i.len() + INPUT_OVERHEAD;
                    chunk.push(Bytes(i));
                }
                None => break,
            }
        }
        let tasks = self.seal_job(job, from).await?;
        Ok((job, tasks))
    }

    /// Open a job to be filled in chunks, or find the one `key` names:
    /// `(job, inputs the pool holds, sealed)`.
    pub async fn open_job(
        &self,
        bundle: Digest,
        key: String,
        priority: i8,
    ) -> Result<(JobId, u32, bool), ClientError> {
        match self
            .call(&Request::OpenJob {
                bundle,
                key,
                priority,
            })
            .await?
        {
            Response::JobOpened { job, have, sealed } => Ok((job, have, sealed)),
            other => Err(unexpected(&other)),
        }
    }

    /// Send inputs `from..` of an open job; returns the inputs it holds.
    pub async fn append_inputs(
        &self,
        job: JobId,
        from: u32,
        inputs: Vec<Bytes>,
    ) -> Result<u32, ClientError> {
        match self
            .call(&Request::AppendInputs { job, from, inputs })
            .await?
        {
            Response::Appended { have, .. } => Ok(have),
            other => Err(unexpected(&other)),
        }
    }

    /// Seal an open job holding `total` inputs; returns its tasks.
    pub async fn seal_job(&self, job: JobId, total: u32) -> Result<u32, ClientError> {
        match self.call(&Request::SealJob { job, total }).await? {
            Response::Submitted { tasks, .. } => Ok(tasks),
            other => Err(unexpected(&other)),
        }
    }

    /// Cancel a job: `(waiting, running)` tasks stopped.
    pub async fn cancel_job(&self, job: JobId) -> Result<(u32, u32), ClientError> {
        match self.call(&Request::CancelJob { job }).await? {
            Response::Cancelled {
                waiting, running, ..
            } => Ok((waiting, running)),
            other => Err(unexpected(&other)),
        }
    }

    /// Tell the pool a finished job's results are safe here: it may
    /// remove its inputs and outputs.
    pub async fn forget_job(&self, job: JobId) -> Result<(), ClientError> {
        match self.call(&Request::ForgetJob { job }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Ask the pool to collect now (admins): `(jobs, tasks, bytes)` removed.
    pub async fn collect(&self) -> Result<(u32, u64, u64), ClientError> {
        match self.call(&Request::Collect).await? {
            Response::Collected { jobs, tasks, bytes } => Ok((jobs, tasks, bytes)),
            other => Err(unexpected(&other)),
        }
    }

    /// A job's progress.
    pub async fn job_status(&self, job: JobId) -> Result<JobSummary, ClientError> {
        match self.call(&Request::JobStatus { job }).await? {
            Response::Job(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// All of a job's task records, in input order.
    pub async fn job_results(&self, job: JobId) -> Result<Vec<TaskRecord>, ClientError> {
        let mut out = Vec::new();
        loop {
            let from = u32::try_from(out.len()).unwrap_or(u32::MAX);
            let page = self.results_page(job, from).await?;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page);
        }
    }

    /// One page of a job's task records from input `from` (at most 1,000,
    /// and at most the pool's page budget of output bytes; empty past the
    /// last input).
    pub async fn results_page(
        &self,
        job: JobId,
        from: u32,
    ) -> Result<Vec<TaskRecord>, ClientError> {
        match self
            .call(&Request::JobResults {
                job,
                from,
                limit: 1000,
            })
            .await?
        {
            Response::Records(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Input `index` of `job`, with everything needed to run it again.
    pub async fn replayable(
        &self,
        job: JobId,
        index: u32,
    ) -> Result<tidepool_proto::replay::Replayable, ClientError> {
        match self.call(&Request::Replayable { job, index }).await? {
            Response::Replayable(r) => Ok(*r),
            other => Err(unexpected(&other)),
        }
    }

    /// Nodes, queue and jobs.
    pub async fn pool_status(&self) -> Result<PoolSummary, ClientError> {
        match self.call(&Request::PoolStatus).await? {
            Response::Pool(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Dispute a result: the pool re-executes the task on another node.
    /// Returns the task checked (the original of a cached copy) and where
    /// the check stands; the outcome appears in the task's record.
    pub async fn challenge(
        &self,
        task: TaskId,
    ) -> Result<tidepool_proto::wire::Challenged, ClientError> {
        match self.call(&Request::Challenge { task }).await? {
            Response::Challenged {
                task,
                job,
                index,
                state,
            } => Ok(tidepool_proto::wire::Challenged {
                target: task,
                job,
                index,
                state,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// One task's record.
    pub async fn task_record(&self, job: JobId, index: u32) -> Result<TaskRecord, ClientError> {
        match self
            .call(&Request::JobResults {
                job,
                from: index,
                limit: 1,
            })
            .await?
        {
            Response::Records(mut v) if v.len() == 1 => Ok(v.remove(0)),
            other => Err(unexpected(&other)),
        }
    }

    /// Add known-answer tasks for a bundle (publishers only); returns how
    /// many the bundle has.
    pub async fn add_canaries(
        &self,
        bundle: Digest,
        items: Vec<Canary>,
    ) -> Result<u32, ClientError> {
        match self.call(&Request::AddCanaries { bundle, items }).await? {
            Response::Canaries { count } => Ok(count),
            other => Err(unexpected(&other)),
        }
    }

    /// Close the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}
