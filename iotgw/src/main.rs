//! `iotgw`: thin wrapper over [`iotgw::cli`].
fn main() {
    std::process::exit(iotgw::cli::main());
}
