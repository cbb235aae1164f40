//! The job author's SDK for Tidepool.
//!
//! A job is a WASI component that exports `run(input) -> result<output, job-error>`
//! (see `wit/job.wit`). This crate gives a job author:
//!
//! - [`export_job!`]: one line to export a type implementing [`Job`];
//! - [`nn`]: safe wrappers over wasi-nn (load a graph by name, build tensors
//!   from slices, read typed outputs);
//! - [`io`]: JSON and MessagePack helpers for inputs and outputs;
//! - [`llm`]: text generation with a GGUF model in one call;
//! - [`text`]: a BERT WordPiece tokenizer for text models;
//! - [`log`]: leveled logging to the node, and [`task_id`] / [`params`].
//!
//! It never does I/O of its own: a job has no files, sockets, environment or
//! threads (see the WIT for the whole contract).

pub mod io;
pub mod llm;
pub mod log;
pub mod nn;
pub mod text;
#[cfg(target_os = "wasi")]
mod wasi_libc_shims;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "tidepool:job/job",
        pub_export_macro: true,
        export_macro_name: "__export_job_world",
        default_bindings_module: "tidepool_guest::bindings",
        generate_all,
    });
}

pub use bindings::tidepool::job::types::ErrorCode;

/// The error a job returns for a task: a code for machines, a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// What kind of failure this is; `InvalidInput` is never retried.
    pub code: ErrorCode,
    /// A one-line explanation, shown to the submitter.
    pub message: String,
}

impl JobError {
    /// The input is not acceptable (re-running it gives the same error).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidInput,
            message: message.into(),
        }
    }
    /// A model could not be loaded or inference failed.
    pub fn model(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Model,
            message: message.into(),
        }
    }
    /// A bug or impossible state inside the job.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Internal,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl From<nn::NnError> for JobError {
    fn from(e: nn::NnError) -> Self {
        JobError::model(e.to_string())
    }
}

impl From<JobError> for bindings::tidepool::job::types::JobError {
    fn from(e: JobError) -> Self {
        Self {
            code: e.code,
            message: e.message,
        }
    }
}

/// A pipeline job: turns one task's input bytes into its output bytes.
///
/// `run` is called once per task on a fresh instance, so a job keeps no state
/// between tasks.
pub trait Job {
    /// Run one task.
    fn run(input: Vec<u8>) -> Result<Vec<u8>, JobError>;
}

/// The id of the task being run; stable across re-executions of the task.
pub fn task_id() -> String {
    bindings::tidepool::job::host::task_id()
}

/// The task's parameters from the job manifest, sorted by key.
pub fn params() -> Vec<(String, String)> {
    bindings::tidepool::job::host::params()
}

/// Export a type implementing [`Job`] as this component's `run`.
///
/// ```ignore
/// struct Echo;
/// impl tidepool_guest::Job for Echo {
///     fn run(input: Vec<u8>) -> Result<Vec<u8>, tidepool_guest::JobError> { Ok(input) }
/// }
/// tidepool_guest::export_job!(Echo);
/// ```
#[macro_export]
macro_rules! export_job {
    ($job:ty) => {
        #[doc(hidden)]
        pub struct __TidepoolJobExport;
        impl $crate::bindings::Guest for __TidepoolJobExport {
            fn run(
                input: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<
                ::std::vec::Vec<u8>,
                $crate::bindings::tidepool::job::types::JobError,
            > {
                <$job as $crate::Job>::run(input).map_err(::std::convert::Into::into)
            }
        }
        $crate::bindings::__export_job_world!(__TidepoolJobExport);
    };
}
