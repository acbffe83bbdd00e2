//! The HTTP status of each kind of failure: the one place they are mapped,
//! used by the API (`api::error`) and by the proxies (`proxy`), so that one
//! failure answers with one status wherever it is met.

use axum::http::StatusCode;

use crate::service::ErrorKind;

/// The HTTP status of a kind of failure.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable | ErrorKind::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        for (kind, status) in [
            (ErrorKind::Invalid, 400),
            (ErrorKind::Unauthorized, 401),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::TooLarge, 413),
            (ErrorKind::LimitExceeded, 429),
            (ErrorKind::Internal, 500),
            (ErrorKind::BadGateway, 502),
            (ErrorKind::Unavailable, 503),
            (
                ErrorKind::Busy {
                    retry_after_secs: 1,
                },
                503,
            ),
            (ErrorKind::NoSpace, 507),
        ] {
            assert_eq!(status_of(kind).as_u16(), status, "{kind:?}");
        }
    }
}
