//! Generates the Mosquitto plugin API bindings from the system headers.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=include/wrapper.h");
    println!("cargo:rerun-if-env-changed=MOSQUITTO_INCLUDE_DIR");
    let mut builder = bindgen::Builder::default()
        .header("include/wrapper.h")
        .allowlist_function("mosquitto_(plugin_version|plugin_init|plugin_cleanup|callback_register|callback_unregister|log_printf|client_username|client_certificate|broker_publish_copy|kick_client_by_username)")
        .allowlist_type("mosquitto_(evt_.*|opt|plugin_id_t)")
        .allowlist_var("MOSQ_(ERR|EVT|ACL|LOG)_.*|MOSQ_PLUGIN_VERSION")
        .allowlist_type("mosq_err_t|mosquitto_plugin_event")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    if let Ok(dir) = env::var("MOSQUITTO_INCLUDE_DIR") {
        builder = builder.clang_arg(format!("-I{dir}"));
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!("bindgen failed on include/wrapper.h ({e}); install mosquitto-dev, libmosquitto-dev and libclang-dev (`make deps`)")
    });
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("mosquitto_sys.rs");
    bindings.write_to_file(out).expect("write bindings");
}
