//! The driver's domain error and the one table that maps it to gRPC status codes.
//!
//! Port errors are typed (see [`crate::ports`]); services return [`Error`]; tonic sees a
//! [`tonic::Status`] only through `From<Error> for Status` below. No string matching.

use tonic::{Code, Status};

use crate::ports::{
    cluster::ClusterError, initiator::InitiatorError, mounter::MountError, rds::RdsError,
    store::StoreError,
};

/// Result with the driver's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a CSI call can fail with. Messages name the field or object at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named volume, snapshot or node does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object exists with incompatible properties.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state the call needs (e.g. held by another node).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size or count outside what is supported.
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same object is in flight, or a bad pagination token.
    #[error("{0}")]
    Aborted(String),
    /// A limit was reached (e.g. max volumes per node, pool space).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency is unreachable or not ready; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The plugin does not offer this call.
    #[error("{0}")]
    Unimplemented(String),
    /// A bug or an invariant violation.
    #[error("{0}")]
    Internal(String),
    /// From the `Rds` port.
    #[error(transparent)]
    Rds(#[from] RdsError),
    /// From the `AttachmentStore` port.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From the `Cluster` port.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// From the `Initiator` port.
    #[error(transparent)]
    Initiator(#[from] InitiatorError),
    /// From the `Mounter` port.
    #[error(transparent)]
    Mount(#[from] MountError),
}

impl Error {
    /// The gRPC code this error is answered with: the single mapping table.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Internal(_) => Code::Internal,
            Error::Rds(e) => match e {
                RdsError::NotFound(_) => Code::NotFound,
                RdsError::AlreadyExists(_) => Code::AlreadyExists,
                RdsError::Rejected(_) => Code::InvalidArgument,
                RdsError::NoSpace(_) => Code::ResourceExhausted,
                RdsError::Unavailable(_) | RdsError::Timeout(_) => Code::Unavailable,
                RdsError::HostKey(_) => Code::FailedPrecondition,
                RdsError::Protocol(_) => Code::Internal,
            },
            Error::Store(e) => match e {
                StoreError::Conflict(_) => Code::Aborted,
                StoreError::NotFound(_) => Code::NotFound,
                StoreError::Unavailable(_) => Code::Unavailable,
                StoreError::Corrupt(_) | StoreError::Io(_) => Code::Internal,
            },
            Error::Cluster(e) => match e {
                ClusterError::Unavailable(_) => Code::Unavailable,
                ClusterError::Other(_) => Code::Internal,
            },
            Error::Initiator(e) => match e {
                InitiatorError::NotForThisDriver(_) => Code::FailedPrecondition,
                InitiatorError::Timeout(_) => Code::DeadlineExceeded,
                InitiatorError::Unavailable(_) => Code::Unavailable,
                InitiatorError::Command(_) => Code::Internal,
            },
            Error::Mount(e) => match e {
                MountError::NotFound(_) => Code::NotFound,
                MountError::Timeout(_) => Code::DeadlineExceeded,
                MountError::Busy(_) => Code::FailedPrecondition,
                MountError::Unsupported(_) | MountError::Corrupt(_) => Code::FailedPrecondition,
                MountError::Command(_) | MountError::Io(_) => Code::Internal,
            },
        }
    }
}

/// A malformed identifier is the caller's mistake: INVALID_ARGUMENT with its message.
impl From<crate::types::InvalidId> for Error {
    fn from(err: crate::types::InvalidId) -> Self {
        Error::InvalidArgument(err.0)
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_errors_map_to_actionable_codes() {
        let cases: Vec<(Error, Code)> = vec![
            (
                RdsError::NotFound("disk pvc-1".into()).into(),
                Code::NotFound,
            ),
            (
                RdsError::Timeout("disk print".into()).into(),
                Code::Unavailable,
            ),
            (
                RdsError::NoSpace("pool".into()).into(),
                Code::ResourceExhausted,
            ),
            (StoreError::Conflict("pv-1".into()).into(), Code::Aborted),
            (Error::Aborted("in flight".into()), Code::Aborted),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
        }
    }
}
