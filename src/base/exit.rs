//! The one table of exit statuses (also in the man page, `docs_extra.rs`).

/// The stage did its work.
pub(crate) const OK: i32 = 0;
/// The job failed; the written document says why.
pub(crate) const JOB_FAILED: i32 = 1;
/// Bad flags or configuration.
pub(crate) const USAGE: i32 = 2;
/// The input document could not be read.
pub(crate) const BAD_DOCUMENT: i32 = 3;
/// `dequeue` found no job.
pub(crate) const NO_JOB: i32 = 4;
/// Temporary infrastructure failure (EX_TEMPFAIL).
pub(crate) const TEMPFAIL: i32 = 75;

/// An error that carries its exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ExitError {
    pub code: i32,
    pub message: String,
}

impl ExitError {
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        ExitError { code, message: message.into() }
    }
}

/// The exit status for an error chain.
pub(crate) fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ExitError>() {
            return e.code;
        }
    }
    JOB_FAILED
}
