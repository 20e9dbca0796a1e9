#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgelb::fuzz::http_answer(data));
