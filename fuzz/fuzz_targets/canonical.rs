#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iotgw_fuzz::canonical(data));
