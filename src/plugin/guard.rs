//! The panic boundary. Every entry point and callback runs its body through [`guard`], which
//! catches a panic, logs it once and returns the callback's fail-closed fallback:
//!
//! | entry point | fallback | why |
//! |---|---|---|
//! | plugin version | `-1` (no version) | the broker refuses to load a plugin it cannot talk to |
//! | ACL check | `MOSQ_ERR_ACL_DENIED` | drop the message / refuse the access; the client stays connected |
//! | init | `MOSQ_ERR_UNKNOWN` | the broker refuses to start rather than run unprotected |
//! | tick | `MOSQ_ERR_SUCCESS` | nothing to refuse; the next tick retries the work |
//! | reload | `MOSQ_ERR_SUCCESS` | an error here disables acl_file in 2.0.11 and crashes later |
//! | cleanup | `MOSQ_ERR_SUCCESS` | the broker is exiting anyway |

use super::broker::log_raw;
use super::sys;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic into `fallback` plus one error line.
pub fn guard(name: &str, fallback: c_int, f: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            // Logging itself must not unwind out of here.
            let _ = catch_unwind(|| {
                log_raw(
                    sys::MOSQ_LOG_ERR as c_int,
                    &format!(
                        "secure-iot-gateway: internal error in {name} (failing closed): {what}"
                    ),
                )
            });
            fallback
        }
    }
}
