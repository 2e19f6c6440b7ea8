#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iotgw_fuzz::store_recovery(data));
