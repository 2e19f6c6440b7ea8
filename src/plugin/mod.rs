//! The FFI shim: the only place with `extern "C"`, raw pointers and `mosquitto_*` calls.
//!
//! Threading: Mosquitto is single-threaded and nothing in its plugin API is thread-safe. Every
//! function here runs on the broker thread; worker threads (registry watcher, checkpointer,
//! forwarders) never call the broker. They hand results over through queues that the tick drains,
//! and wake the loop with [`wake::Waker`].
//!
//! Lifetime: init boxes an [`Instance`] into `*userdata` and registers the callbacks with it;
//! cleanup unregisters them, joins every thread and frees the box. Nothing lives in globals.
//! (`per_listener_settings true` is not supported: 2.0.11 never ticks such an instance, and
//! a second instance on the same spool_path is refused by the outbox lock; see the README.)

mod broker;
mod guard;
mod identity;
mod sys;
mod wake;

use crate::acl::{self, Access, Identity, Verdict};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::host::{unix_now, Host, Level};
use broker::BrokerHost;
use guard::guard;
use std::cell::RefCell;
use std::os::raw::{c_int, c_void};
use std::sync::Arc;

const ERR_SUCCESS: c_int = sys::MOSQ_ERR_SUCCESS as c_int;
const ERR_ACL_DENIED: c_int = sys::MOSQ_ERR_ACL_DENIED as c_int;
const ERR_DEFER: c_int = sys::MOSQ_ERR_PLUGIN_DEFER as c_int;
const ERR_UNKNOWN: c_int = sys::MOSQ_ERR_UNKNOWN as c_int;
const ERR_INVAL: c_int = sys::MOSQ_ERR_INVAL as c_int;

/// One loaded plugin instance.
struct Instance {
    identifier: *mut sys::mosquitto_plugin_id_t,
    /// Immutable after init: the ACL read path needs only this, never the mutable state.
    cfg: Config,
    gateway: RefCell<Gateway>,
    /// Certificate data per connection (see [`identity`]).
    identities: identity::Identities,
    waker: Arc<wake::Waker>,
    /// Whether the broker offers 2.1's CONNECT event (registered) or not (2.0).
    connect_event: std::cell::Cell<bool>,
}

type Callback = unsafe extern "C" fn(c_int, *mut c_void, *mut c_void) -> c_int;
const EVENTS: [(u32, Callback); 4] = [
    (sys::MOSQ_EVT_ACL_CHECK, on_acl_check),
    (sys::MOSQ_EVT_DISCONNECT, on_disconnect),
    (sys::MOSQ_EVT_TICK, on_tick),
    (sys::MOSQ_EVT_RELOAD, on_reload),
];

// Pin the exported signatures to the header's declarations: a drift is a type error.
const _: [unsafe extern "C" fn(c_int, *const c_int) -> c_int; 2] =
    [sys::mosquitto_plugin_version, mosquitto_plugin_version];
const _: [unsafe extern "C" fn(
    *mut sys::mosquitto_plugin_id_t,
    *mut *mut c_void,
    *mut sys::mosquitto_opt,
    c_int,
) -> c_int; 2] = [sys::mosquitto_plugin_init, mosquitto_plugin_init];
const _: [unsafe extern "C" fn(*mut c_void, *mut sys::mosquitto_opt, c_int) -> c_int; 2] =
    [sys::mosquitto_plugin_cleanup, mosquitto_plugin_cleanup];

/// Plugin API version negotiation: we speak v5 only.
///
/// # Safety
/// Called by the broker with its list of supported versions.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_version(count: c_int, versions: *const c_int) -> c_int {
    // On a panic, answer -1: no version we speak, so the broker refuses to load us.
    guard("plugin_version", -1, || {
        let offered = if versions.is_null() || count <= 0 {
            &[][..]
        } else {
            // SAFETY: the broker passes `count` ints at `versions`.
            unsafe { std::slice::from_raw_parts(versions, count as usize) }
        };
        if !offered.contains(&5) {
            broker::log_raw(
                sys::MOSQ_LOG_ERR as c_int,
                "secure-iot-gateway: needs plugin API v5 (Mosquitto 2.0 or later)",
            );
        }
        5
    })
}

/// Reads the broker's option array into owned (key, value) pairs; non-UTF-8 is kept lossily so
/// the config error can still name it.
///
/// # Safety
/// `opts` points to `count` valid options (or is NULL with count 0).
unsafe fn read_opts(opts: *const sys::mosquitto_opt, count: c_int) -> Vec<(String, String)> {
    if opts.is_null() || count <= 0 {
        return Vec::new();
    }
    // SAFETY: the broker passes `count` options at `opts`, valid until cleanup.
    let slice = unsafe { std::slice::from_raw_parts(opts, count as usize) };
    let text = |p: *mut std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the broker's option strings are NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    slice.iter().map(|o| (text(o.key), text(o.value))).collect()
}

/// Parses the options, opens the registry and outbox, starts the workers, registers callbacks.
/// Any failure is logged as one line naming the option, and the broker refuses to start.
///
/// # Safety
/// Called once per instance by the broker, on its thread, with valid pointers.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_init(
    identifier: *mut sys::mosquitto_plugin_id_t,
    userdata: *mut *mut c_void,
    opts: *mut sys::mosquitto_opt,
    count: c_int,
) -> c_int {
    guard("init", ERR_UNKNOWN, || {
        // SAFETY: we are inside init, on the broker thread.
        let mut host = unsafe { BrokerHost::new() };
        // SAFETY: forwarded from the broker's arguments.
        let pairs = unsafe { read_opts(opts, count) };
        let cfg = match Config::from_opts(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(c) => c,
            Err(e) => {
                host.log(Level::Error, &format!("secure-iot-gateway: configuration error: {e}"));
                return ERR_INVAL;
            }
        };
        let waker = match wake::Waker::install() {
            Ok(w) => Arc::new(w),
            Err(e) => {
                host.log(
                    Level::Error,
                    &format!("secure-iot-gateway: cannot install the wake-up signal: {e}"),
                );
                return ERR_UNKNOWN;
            }
        };
        let w = waker.clone();
        let gw = match Gateway::start(cfg.clone(), Arc::new(move || w.request()), &mut host) {
            Ok(g) => g,
            Err(e) => {
                host.log(Level::Error, &format!("secure-iot-gateway: configuration error: {e}"));
                return ERR_INVAL;
            }
        };
        // SAFETY: the identifier from the broker, inside init.
        let named = unsafe {
            broker::set_plugin_info(
                identifier,
                c"secure-iot-gateway",
                const { c_str(concat!(env!("CARGO_PKG_VERSION"), "\0")) },
            )
        };
        if let Some(rc) = named.filter(|rc| *rc != ERR_SUCCESS) {
            host.log(
                Level::Warning,
                &format!("secure-iot-gateway: mosquitto_plugin_set_info failed (rc {rc})"),
            );
        }
        host.log(
            Level::Notice,
            &format!("secure-iot-gateway {} loaded: {}", env!("CARGO_PKG_VERSION"), gw.describe()),
        );
        let inst = Box::into_raw(Box::new(Instance {
            identifier,
            cfg,
            gateway: RefCell::new(gw),
            identities: Default::default(),
            waker,
            connect_event: std::cell::Cell::new(false),
        }));
        for (event, cb) in EVENTS {
            // SAFETY: valid identifier from init; `inst` outlives the registration (freed in cleanup
            // after unregistering).
            let rc = unsafe {
                sys::mosquitto_callback_register(
                    identifier,
                    event as c_int,
                    Some(cb),
                    std::ptr::null(),
                    inst as *mut c_void,
                )
            };
            if rc != ERR_SUCCESS {
                host.log(
                    Level::Error,
                    &format!(
                        "secure-iot-gateway: cannot register callback for event {event} (rc {rc})"
                    ),
                );
                // SAFETY: undo what was registered, then free the instance we still own.
                unsafe { teardown(inst) };
                return ERR_UNKNOWN;
            }
        }
        // 2.1 tells us when a client has connected: a revoked device is closed there, before it
        // acts. 2.0 has no such event (it refuses the registration); there the first publish or
        // subscribe does it.
        // SAFETY: as for the events above.
        let rc = unsafe {
            sys::mosquitto_callback_register(
                identifier,
                sys::MOSQ_EVT_CONNECT_2_1 as c_int,
                Some(on_connect),
                std::ptr::null(),
                inst as *mut c_void,
            )
        };
        // SAFETY: `inst` is ours until cleanup.
        unsafe { (*inst).connect_event.set(rc == ERR_SUCCESS) };
        if !userdata.is_null() {
            // SAFETY: the broker passes a valid out-pointer.
            unsafe { *userdata = inst as *mut c_void };
        }
        ERR_SUCCESS
    })
}

/// Unregisters every callback, stops and joins every thread, frees the instance.
///
/// # Safety
/// `inst` came from `Box::into_raw` in init and is not used afterwards.
unsafe fn teardown(inst: *mut Instance) {
    // SAFETY: per the function contract.
    let instance = unsafe { Box::from_raw(inst) };
    for (event, cb) in EVENTS {
        // SAFETY: the identifier from init; unregistering a callback never registered is harmless.
        unsafe {
            sys::mosquitto_callback_unregister(
                instance.identifier,
                event as c_int,
                Some(cb),
                std::ptr::null(),
            )
        };
    }
    if instance.connect_event.get() {
        // SAFETY: registered in init with this identifier and callback.
        unsafe {
            sys::mosquitto_callback_unregister(
                instance.identifier,
                sys::MOSQ_EVT_CONNECT_2_1 as c_int,
                Some(on_connect),
                std::ptr::null(),
            )
        };
    }
    // SAFETY: cleanup runs on the broker thread.
    let mut host = unsafe { BrokerHost::new() };
    if let Ok(mut gw) = instance.gateway.try_borrow_mut() {
        gw.shutdown(&mut host);
    }
    // After the workers are joined nobody requests a tick any more; no signal after this.
    instance.waker.stop();
    host.log(Level::Notice, "secure-iot-gateway: stopped; every worker joined");
    drop(instance);
}

/// # Safety
/// Called by the broker at shutdown with the userdata set in init.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_cleanup(
    userdata: *mut c_void,
    _opts: *mut sys::mosquitto_opt,
    _count: c_int,
) -> c_int {
    guard("cleanup", ERR_SUCCESS, || {
        if !userdata.is_null() {
            // SAFETY: userdata is the Instance boxed in init, handed back once.
            unsafe { teardown(userdata as *mut Instance) };
        }
        ERR_SUCCESS
    })
}

/// A `&'static CStr` from a literal with its own trailing NUL (checked at compile time).
const fn c_str(s: &'static str) -> &'static std::ffi::CStr {
    match std::ffi::CStr::from_bytes_with_nul(s.as_bytes()) {
        Ok(c) => c,
        Err(_) => panic!("not a C string"),
    }
}

/// Maps a verdict to the broker's return codes.
fn rc(v: Verdict) -> c_int {
    match v {
        Verdict::Allow => ERR_SUCCESS,
        Verdict::Deny => ERR_ACL_DENIED,
        Verdict::Defer => ERR_DEFER,
    }
}

/// A client's username, what its certificate says (read once per connection; the serial only with
/// a CRL) and so its identity. The certificate is only consulted when there is a username it
/// could vouch for.
///
/// # Safety
/// `client` is the valid client pointer of the current callback.
unsafe fn client_identity<'a>(
    inst: &Instance,
    client: *const sys::mosquitto,
) -> (Option<&'a [u8]>, Option<std::rc::Rc<identity::ClientCert>>, Identity<'a>) {
    // SAFETY: per the function contract.
    let username = unsafe { broker::client_username(client) };
    let with_serial = inst.cfg.crl_file.is_some();
    // SAFETY: as above.
    let found = username.and_then(|u| unsafe { inst.identities.get(client, u, with_serial) });
    let (cert, new) = match found {
        Some((c, new)) => (Some(c), new),
        None => (None, false),
    };
    let who = match &cert {
        // Classified once per connection: the entry is only returned for the same certificate
        // object and username.
        Some(c) => {
            let class = c.class.get().unwrap_or_else(|| {
                let class = acl::classify(&inst.cfg, username, Some(&c.cn));
                c.class.set(Some(class));
                class
            });
            class.of(username)
        }
        None => acl::identity(&inst.cfg, username, None),
    };
    if new && inst.cfg.cluster.is_some() {
        // A new connection: in cluster mode the other nodes close any older session of it.
        // Skipped when the gateway is busy (a re-entered check); the next new session tells.
        if let Ok(mut gw) = inst.gateway.try_borrow_mut() {
            gw.on_session(who, crate::host::unix_now_ms());
        }
    }
    (username, cert, who)
}

/// Every ACL question. WRITE carries publishes and wills: data-topic messages are validated here.
unsafe extern "C" fn on_acl_check(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guard("acl_check", ERR_ACL_DENIED, || {
        if event_data.is_null() || userdata.is_null() {
            return ERR_ACL_DENIED;
        }
        // SAFETY: registered with an Instance pointer that lives until cleanup.
        let inst = unsafe { &*(userdata as *const Instance) };
        // SAFETY: the broker passes a valid mosquitto_evt_acl_check for this event.
        let ed = unsafe { &*(event_data as *const sys::mosquitto_evt_acl_check) };
        if ed.client.is_null() || ed.topic.is_null() {
            return ERR_ACL_DENIED;
        }
        // SAFETY: valid client pointer for the duration of the callback.
        let (username, cert, who) = unsafe { client_identity(inst, ed.client) };
        if let (Some(serial), Some(user)) =
            (cert.as_ref().and_then(|c| c.serial.as_ref()), username)
        {
            // A revoked certificate is refused whatever it asks (and disconnected at the next
            // tick); with the gateway busy (a re-entered READ check) it is refused too.
            let revoked = match inst.gateway.try_borrow_mut() {
                Ok(mut gw) => gw.cert_revoked(&String::from_utf8_lossy(user), serial),
                Err(_) => true,
            };
            if revoked {
                return ERR_ACL_DENIED;
            }
        }
        // SAFETY: the topic is a NUL-terminated string valid during the callback.
        let topic = unsafe { std::ffi::CStr::from_ptr(ed.topic) }.to_bytes();
        let access = ed.access as u32;
        if access == sys::MOSQ_ACL_WRITE {
            let payload: &[u8] = if ed.payload.is_null() || ed.payloadlen == 0 {
                &[]
            } else {
                // SAFETY: the broker's payload buffer holds payloadlen bytes during the callback.
                unsafe {
                    std::slice::from_raw_parts(ed.payload as *const u8, ed.payloadlen as usize)
                }
            };
            return write_check(inst, who, topic, payload);
        }
        let access = match access {
            sys::MOSQ_ACL_READ => Access::Read,
            sys::MOSQ_ACL_SUBSCRIBE => Access::Subscribe,
            sys::MOSQ_ACL_UNSUBSCRIBE => Access::Unsubscribe,
            _ => {
                return if matches!(who, Identity::Device(_)) { ERR_ACL_DENIED } else { ERR_DEFER }
            }
        };
        // The registry check needs the gateway; a READ check re-entered while the gateway is
        // busy (our own log line delivered to a log topic) gets the configuration's answer,
        // which never lets a device read anything but its own response topic.
        match inst.gateway.try_borrow_mut() {
            Ok(mut gw) => rc(gw.on_access(who, access, topic)),
            Err(_) => rc(acl::acl_verdict(&inst.cfg, who, access, topic)),
        }
    })
}

/// 2.1 only: a client has connected (CONNACK sent). A revoked device, a revoked certificate or an
/// invalid identity is closed at the next tick, which is requested now.
unsafe extern "C" fn on_connect(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guard("connect", ERR_SUCCESS, || {
        if event_data.is_null() || userdata.is_null() {
            return ERR_SUCCESS;
        }
        // SAFETY: registered with an Instance pointer that lives until cleanup.
        let inst = unsafe { &*(userdata as *const Instance) };
        // SAFETY: 2.1 passes its mosquitto_evt_connect for this event (layout asserted in sys).
        let ed = unsafe { &*(event_data as *const sys::mosquitto_evt_connect_2_1) };
        if ed.client.is_null() {
            return ERR_SUCCESS;
        }
        // SAFETY: valid client pointer for the duration of the callback.
        let (username, cert, who) = unsafe { client_identity(inst, ed.client) };
        let Some(user) = username else { return ERR_SUCCESS };
        let serial = cert.as_ref().and_then(|c| c.serial.as_deref());
        let close = match inst.gateway.try_borrow_mut() {
            Ok(mut gw) => gw.on_connect(who, &String::from_utf8_lossy(user), serial),
            Err(_) => false,
        };
        if close {
            inst.waker.request();
        }
        ERR_SUCCESS
    })
}

/// A connection ended: forget what its certificate said.
unsafe extern "C" fn on_disconnect(
    _event: c_int,
    event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guard("disconnect", ERR_SUCCESS, || {
        if event_data.is_null() || userdata.is_null() {
            return ERR_SUCCESS;
        }
        // SAFETY: registered with an Instance pointer that lives until cleanup.
        let inst = unsafe { &*(userdata as *const Instance) };
        // SAFETY: the broker passes a valid mosquitto_evt_disconnect for this event.
        let ed = unsafe { &*(event_data as *const sys::mosquitto_evt_disconnect) };
        inst.identities.forget(ed.client);
        ERR_SUCCESS
    })
}

fn write_check(inst: &Instance, who: Identity<'_>, topic: &[u8], payload: &[u8]) -> c_int {
    // SAFETY: inside the ACL callback, on the broker thread.
    let mut host = unsafe { BrokerHost::new() };
    let Ok(mut gw) = inst.gateway.try_borrow_mut() else {
        // Re-entered while the gateway is busy (cannot happen for WRITE in 2.0): fail closed.
        return ERR_ACL_DENIED;
    };
    rc(gw.on_write(&mut host, who, topic, payload, unix_now()).verdict())
}

/// Drains worker results (responses, outbox updates), applies registry snapshots, housekeeping.
unsafe extern "C" fn on_tick(
    _event: c_int,
    _event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guard("tick", ERR_SUCCESS, || {
        if userdata.is_null() {
            return ERR_SUCCESS;
        }
        // SAFETY: registered with an Instance pointer that lives until cleanup.
        let inst = unsafe { &*(userdata as *const Instance) };
        let full = inst.waker.tick_started();
        if let Ok(mut gw) = inst.gateway.try_borrow_mut() {
            if !full && !gw.wants_tick() {
                return ERR_SUCCESS;
            }
            // SAFETY: inside the tick callback, on the broker thread.
            let mut host = unsafe { BrokerHost::new() };
            gw.on_tick(&mut host, unix_now());
            if host.published > 0 {
                // 2.1 sends what a tick published only at the next pass, after its network wait
                // (100 ms with websockets, up to 24 h without): make that pass come now.
                inst.waker.request_next_pass();
            }
        }
        // `next_ms` stays 0 (the broker zeroes the event): 2.1 then calls us on every pass and
        // never skips us; a skipped tick would not reschedule itself. Our own clock (wake.rs)
        // bounds the gap between passes.
        ERR_SUCCESS
    })
}

/// SIGHUP. Options are not re-read by the broker (plugin lines are not reloadable); the registry
/// is already watched. Must return success: an error here disables acl_file in 2.0.11.
unsafe extern "C" fn on_reload(
    _event: c_int,
    _event_data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guard("reload", ERR_SUCCESS, || {
        if userdata.is_null() {
            return ERR_SUCCESS;
        }
        // SAFETY: registered with an Instance pointer that lives until cleanup.
        let inst = unsafe { &*(userdata as *const Instance) };
        // SAFETY: inside the reload callback, on the broker thread.
        let mut host = unsafe { BrokerHost::new() };
        if let Ok(mut gw) = inst.gateway.try_borrow_mut() {
            gw.log_stats(&mut host);
        }
        host.log(Level::Notice, "secure-iot-gateway: reload: registry changes apply on their own; plugin_opt_* changes need a restart");
        ERR_SUCCESS
    })
}
