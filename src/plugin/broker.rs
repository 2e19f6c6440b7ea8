//! Safe wrappers over the few broker functions the gateway calls. All of them may be called only
//! on the broker thread, inside a callback; [`BrokerHost`] is `!Send` so it cannot leave it.

use super::sys;
use crate::host::{Host, Level};
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int, c_void};

/// Writes one line to the broker log.
pub fn log_raw(level: c_int, msg: &str) {
    let Ok(c) = CString::new(msg.replace('\0', "\\0")) else { return };
    // SAFETY: "%s" with one NUL-terminated string argument matches the variadic contract.
    unsafe { sys::mosquitto_log_printf(level, c"%s".as_ptr(), c.as_ptr()) };
}

/// The broker as the core sees it. Constructed only inside callbacks.
pub struct BrokerHost {
    /// Messages this host handed to the broker (so the tick knows a flush is owed).
    pub published: usize,
    _not_send: PhantomData<*const ()>,
}

impl BrokerHost {
    /// # Safety
    /// Only on the broker thread, inside a broker callback.
    pub unsafe fn new() -> Self {
        BrokerHost { published: 0, _not_send: PhantomData }
    }
}

/// Looks a broker function up at run time. Functions newer than 2.0 must never be imported: an
/// undefined symbol makes the whole .so fail to load on 2.0.x. The broker executable exports its
/// API, so the global namespace (RTLD_DEFAULT) finds them where they exist.
fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: RTLD_DEFAULT with a NUL-terminated name; dlsym only reads the name.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// 2.1+: `int mosquitto_plugin_set_info(mosquitto_plugin_id_t *, const char *name, const char
/// *version)`; the broker copies both strings.
type SetInfo =
    unsafe extern "C" fn(*mut sys::mosquitto_plugin_id_t, *const c_char, *const c_char) -> c_int;

/// Gives the broker our name and version for its log, where the broker has the function (2.1+).
/// Returns None on brokers without it (2.0.x), else the broker's return code.
///
/// # Safety
/// `identifier` is the one passed to init; call on the broker thread.
pub unsafe fn set_plugin_info(
    identifier: *mut sys::mosquitto_plugin_id_t,
    name: &CStr,
    version: &CStr,
) -> Option<c_int> {
    let f = lookup(c"mosquitto_plugin_set_info")?;
    // SAFETY: the symbol has this signature in every broker that exports it (2.1 broker.h).
    let f: SetInfo = unsafe { std::mem::transmute::<*mut c_void, SetInfo>(f) };
    // SAFETY: valid identifier and NUL-terminated strings, copied by the broker.
    Some(unsafe { f(identifier, name.as_ptr(), version.as_ptr()) })
}

impl Host for BrokerHost {
    fn log(&mut self, level: Level, msg: &str) {
        let l = match level {
            Level::Debug => sys::MOSQ_LOG_DEBUG,
            Level::Info => sys::MOSQ_LOG_INFO,
            Level::Notice => sys::MOSQ_LOG_NOTICE,
            Level::Warning => sys::MOSQ_LOG_WARNING,
            Level::Error => sys::MOSQ_LOG_ERR,
        };
        log_raw(l as c_int, msg);
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        let Ok(t) = CString::new(topic) else { return false };
        let Ok(len) = c_int::try_from(payload.len()) else { return false };
        // SAFETY: valid NUL-terminated topic; the _copy variant copies the payload, so the broker
        // never frees our buffer; NULL clientid = normal delivery to subscribers (READ ACL applies).
        let rc = unsafe {
            sys::mosquitto_broker_publish_copy(
                std::ptr::null(),
                t.as_ptr(),
                len,
                payload.as_ptr() as *const c_void,
                1,
                false,
                std::ptr::null_mut(),
            )
        };
        let ok = rc == sys::MOSQ_ERR_SUCCESS as c_int;
        self.published += usize::from(ok);
        ok
    }

    fn kick(&mut self, username: &str) {
        let Ok(u) = CString::new(username) else { return };
        // SAFETY: a valid NUL-terminated username; called from the tick on the broker thread,
        // never from inside that client's own packet handling (see Gateway::kick).
        unsafe { sys::mosquitto_kick_client_by_username(u.as_ptr(), false) };
    }
}

/// The client's username bytes, if it has one.
///
/// # Safety
/// `client` is the valid client pointer of the current callback.
pub unsafe fn client_username<'a>(client: *const sys::mosquitto) -> Option<&'a [u8]> {
    // SAFETY: the broker owns the string for at least the duration of the callback.
    let p = unsafe { sys::mosquitto_client_username(client) };
    if p.is_null() {
        None
    } else {
        // SAFETY: non-NULL, NUL-terminated, valid during the callback (not necessarily UTF-8).
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}
