#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| resync_fuzz::payload(data));
