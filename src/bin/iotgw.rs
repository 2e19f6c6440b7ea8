//! `iotgw`: thin wrapper over `secure_iot_gateway::cli`.
fn main() {
    std::process::exit(secure_iot_gateway::cli::main());
}
