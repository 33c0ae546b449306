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
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ControllerError> for Status {
    fn from(err: ControllerError) -> Status {
        let code = match &err {
            ControllerError::InvalidSpec(_) | ControllerError::InvalidRequest(_) => Code::InvalidArgument,
            ControllerError::JobNotFound(_) => Code::NotFound,
            ControllerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControllerError::Store(StoreError::Conflict { .. }) => Code::Aborted,
            ControllerError::Store(StoreError::Backend(_)) => Code::Unavailable,
        };
        Status::new(code, err.to_string())
    }
}
