#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iotgw_fuzz::http_response(data));
