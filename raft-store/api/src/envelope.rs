//! The envelope every `/v1` answer travels in, Unikraft Cloud's:
//! `{"status":"success","data":{...}}` or
//! `{"status":"error","message":"...","errors":[{"status":409,"message":"..."}]}`.
//!
//! The node writes [`Success`] and [`ErrorBody`]; clients read them back
//! with the same types (`edgelb_client::Client`), and [`error_message`] gives the
//! one line an error answer says, whether or not it is an envelope.

use serde::{Deserialize, Serialize};

use crate::model::ApplyError;

/// `{"status":"success","data":...}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Success<T> {
    /// Always `"success"`.
    pub status: String,
    /// The payload.
    pub data: T,
}

/// Wraps `data` in the success envelope.
pub fn success<T>(data: T) -> Success<T> {
    Success {
        status: "success".to_owned(),
        data,
    }
}

/// `{"status":"error","message":...,"errors":[{"status":..,"message":..}]}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    /// Always `"error"`.
    pub status: String,
    /// For operators.
    pub message: String,
    /// One item per error; the HTTP status is repeated here.
    pub errors: Vec<ErrorItem>,
}

/// One error of an [`ErrorBody`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorItem {
    /// HTTP status.
    pub status: u16,
    /// For operators.
    pub message: String,
}

/// The error envelope with one item.
pub fn error(status: u16, message: impl Into<String>) -> ErrorBody {
    let message = message.into();
    ErrorBody {
        status: "error".to_owned(),
        message: message.clone(),
        errors: vec![ErrorItem { status, message }],
    }
}

impl From<&ApplyError> for ErrorBody {
    fn from(e: &ApplyError) -> Self {
        error(e.status(), e.to_string())
    }
}

/// Longest line [`error_message`] keeps of a body that is not an envelope.
const MAX_SUMMARY_CHARS: usize = 200;

/// What an error answer says in one line: the envelope's `message`, else
/// the first non-blank line of the body (a proxy's error page, say), cut at
/// 200 characters.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body)
        && !e.message.is_empty()
    {
        return e.message;
    }
    let text = String::from_utf8_lossy(body);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(l) if l.chars().count() > MAX_SUMMARY_CHARS => {
            format!("{}…", l.chars().take(MAX_SUMMARY_CHARS).collect::<String>())
        }
        Some(l) => l.to_owned(),
        None => "the admin API answered with an error".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::services::GroupsData;

    #[test]
    fn envelopes() {
        let ok = serde_json::to_value(success(GroupsData {
            service_groups: vec![],
        }))
        .ok();
        assert_eq!(
            ok,
            Some(json!({"status": "success", "data": {"service_groups": []}}))
        );
        let err = serde_json::to_value(error(409, "port 5432 is taken")).ok();
        assert_eq!(
            err,
            Some(json!({
                "status": "error",
                "message": "port 5432 is taken",
                "errors": [{"status": 409, "message": "port 5432 is taken"}]
            }))
        );
        let from_apply = ErrorBody::from(&ApplyError::NotFound("nope".into()));
        assert_eq!(from_apply, error(404, "nope"));
    }

    #[test]
    fn error_messages() {
        let body = br#"{"status":"error","message":"service group \"x\" not found","errors":[{"status":404,"message":"service group \"x\" not found"}]}"#;
        assert_eq!(error_message(body), "service group \"x\" not found");
        assert_eq!(error_message(b"\n  bad gateway\nmore"), "bad gateway");
        assert_eq!(error_message(b""), "the admin API answered with an error");
        let long = "x".repeat(300);
        let cut = error_message(long.as_bytes());
        assert_eq!(cut.chars().count(), MAX_SUMMARY_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
