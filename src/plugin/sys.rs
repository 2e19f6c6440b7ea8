//! bindgen's output for `include/wrapper.h`, plus compile-time checks of the layouts we rely on
//! (x86_64 values measured against Mosquitto 2.0.11's headers).
#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks)]

include!(concat!(env!("OUT_DIR"), "/mosquitto_sys.rs"));

/// 2.1's `MOSQ_EVT_CONNECT` (2.1.2 `include/mosquitto/broker.h`), absent from 2.0's headers: 2.0
/// answers `MOSQ_ERR_NOT_SUPPORTED` when a plugin registers it.
pub const MOSQ_EVT_CONNECT_2_1: u32 = 11;

/// 2.1's `struct mosquitto_evt_connect` (2.1.2 `include/mosquitto/broker.h`).
#[repr(C)]
pub struct mosquitto_evt_connect_2_1 {
    pub future: *mut std::os::raw::c_void,
    pub client: *mut mosquitto,
    pub future2: [*mut std::os::raw::c_void; 4],
}

#[cfg(target_arch = "x86_64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<mosquitto_evt_acl_check>() == 88);
    assert!(offset_of!(mosquitto_evt_acl_check, client) == 8);
    assert!(offset_of!(mosquitto_evt_acl_check, topic) == 16);
    assert!(offset_of!(mosquitto_evt_acl_check, payload) == 24);
    assert!(offset_of!(mosquitto_evt_acl_check, access) == 40);
    assert!(offset_of!(mosquitto_evt_acl_check, payloadlen) == 44);
    assert!(offset_of!(mosquitto_evt_acl_check, qos) == 48);
    assert!(offset_of!(mosquitto_evt_acl_check, retain) == 49);
    assert!(size_of::<mosquitto_evt_tick>() == 72);
    assert!(size_of::<mosquitto_evt_reload>() == 56);
    assert!(size_of::<mosquitto_opt>() == 16);
    assert!(MOSQ_ERR_SUCCESS == 0);
    assert!(MOSQ_ERR_ACL_DENIED == 12);
    assert!(MOSQ_ERR_PLUGIN_DEFER == 17);
    assert!(MOSQ_EVT_ACL_CHECK == 2);
    assert!(MOSQ_EVT_TICK == 9);
    assert!(MOSQ_EVT_RELOAD == 1);
    assert!(MOSQ_EVT_DISCONNECT == 10);
    assert!(offset_of!(mosquitto_evt_disconnect, client) == 8);
    assert!(size_of::<mosquitto_evt_connect_2_1>() == 48);
    assert!(offset_of!(mosquitto_evt_connect_2_1, client) == 8);
    assert!(MOSQ_ACL_READ == 1 && MOSQ_ACL_WRITE == 2);
    assert!(MOSQ_ACL_SUBSCRIBE == 4 && MOSQ_ACL_UNSUBSCRIBE == 8);
};
