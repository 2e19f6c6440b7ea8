//! The `iotgw` command-line tool as a library, so its parts can be tested and reused by the
//! load generator; `src/main.rs` only calls [`cli::main`]. It is a separate workspace member so
//! that none of its dependencies (clap, rumqttc, tiny_http) end up in the plugin `.so`.
pub mod cli;
