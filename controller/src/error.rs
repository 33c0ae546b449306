//! The controller's one error enum, mapped to gRPC status codes in one place.

use cohort_shared::spec::SpecErrors;
use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    InvalidSpec(#[from] SpecErrors),
    #[error("no job {0:?}: `cohort jobs` lists the known jobs")]
    JobNotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A job this cluster could never run (more nodes or GPUs than it has).
    #[error("{0}")]
    Unsatisfiable(String),
    /// Beyond what the caller's role may ask (a submit token's priority cap).
    #[error("{0}")]
    PermissionDenied(String),
    /// A node name another live agent holds.
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ControllerError> for Status {
    fn from(err: ControllerError) -> Status {
        let code = match &err {
            ControllerError::InvalidSpec(_)
            | ControllerError::InvalidRequest(_)
            | ControllerError::Unsatisfiable(_) => Code::InvalidArgument,
            ControllerError::PermissionDenied(_) => Code::PermissionDenied,
            ControllerError::AlreadyExists(_) => Code::AlreadyExists,
            ControllerError::JobNotFound(_) => Code::NotFound,
            ControllerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControllerError::Store(StoreError::Conflict { .. }) => Code::Aborted,
            ControllerError::Store(
                StoreError::Backend(_) | StoreError::Unwritable { .. } | StoreError::Damaged { .. },
            ) => Code::Unavailable,
        };
        Status::new(code, err.to_string())
    }
}
